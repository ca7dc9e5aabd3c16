package store

import (
	"fmt"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/moe-infinity/moe_infinity/go/dtype"
)

// expertsSegment is the literal path segment that marks routed experts.
// Names containing ".shared_experts." or ".shared_expert." do not match.
const expertsSegment = ".experts."

// ExpertIndex lists every routed-expert (MoE) module of a checkpoint.
type ExpertIndex struct {
	// Modules is sorted by Prefix in natural order: dot-separated segments
	// that are both decimal numbers compare numerically (layers.2 <
	// layers.10), others byte-wise; a prefix sorts before its extensions.
	Modules []*MoEModule
}

// Module returns the module with the given prefix, e.g.
// "model.layers.0.block_sparse_moe".
func (x *ExpertIndex) Module(prefix string) (*MoEModule, bool) {
	for _, m := range x.Modules {
		if m.Prefix == prefix {
			return m, true
		}
	}
	return nil, false
}

// MoEModule is one set of routed experts sharing a name prefix.
type MoEModule struct {
	// Prefix is everything before ".experts." in the tensor names, e.g.
	// "model.layers.0.block_sparse_moe".
	Prefix string
	// NumExperts is the number of experts E; expert ids are 0..E-1.
	NumExperts int
	// Roles holds the sorted role names, e.g. ["w1.weight", "w2.weight",
	// "w3.weight"] (one tensor per expert) or ["down_proj", "gate_up_proj"]
	// (fused).
	Roles []string
	// Fused reports the fused layout: one tensor per role whose dimension 0
	// is the expert index. Otherwise every expert has its own tensors.
	Fused bool
	// Quant lists the quantized weights (FP8 block-scaled or MXFP4), each
	// pairing two of Roles, sorted by Name; empty for an unquantized module.
	Quant []QuantWeight

	quantIssues map[string]string // weight name -> why its roles are not a QuantWeight
	fused       []*Tensor         // Fused: tensor per role, aligned with Roles
	experts     [][]*Tensor       // !Fused: [expert][role index]
}

// Part is one expert's piece of one role.
type Part struct {
	// DType is the element type.
	DType dtype.DType
	// Shape is the per-expert shape in elements (for the fused layout the
	// tensor's shape without dimension 0).
	Shape []int64
	// Data holds just this expert's bytes: a read-only view, valid until the
	// checkpoint is closed.
	Data []byte
	// Tensor is the name of the source tensor.
	Tensor string
	// Source is the source tensor's file path, or "host".
	Source string
}

// NumBytes returns the size of the part's data in bytes.
func (p Part) NumBytes() int64 { return int64(len(p.Data)) }

// Part returns expert's piece of role. An expert outside 0..NumExperts-1 or
// an unknown role gives an error wrapping ErrNotFound. The part's dtype is
// not checked: non-float roles (e.g. quantised blocks) are returned as is.
func (m *MoEModule) Part(expert int, role string) (Part, error) {
	if expert < 0 || expert >= m.NumExperts {
		return Part{}, fmt.Errorf("store: MoE module %q: expert %d out of range [0, %d): %w", m.Prefix, expert, m.NumExperts, ErrNotFound)
	}
	ri, ok := slices.BinarySearch(m.Roles, role)
	if !ok {
		return Part{}, fmt.Errorf("store: MoE module %q: no role %q (roles: %s): %w", m.Prefix, role, strings.Join(m.Roles, ", "), ErrNotFound)
	}
	if m.Fused {
		if ri >= len(m.fused) {
			return Part{}, fmt.Errorf("store: MoE module %q: not built by Checkpoint.Experts: %w", m.Prefix, ErrNotFound)
		}
		t := m.fused[ri]
		per := len(t.data) / m.NumExperts
		b, e := expert*per, (expert+1)*per
		return Part{DType: t.DType, Shape: slices.Clone(t.Shape[1:]), Data: t.data[b:e:e], Tensor: t.Name, Source: t.Source}, nil
	}
	if expert >= len(m.experts) || ri >= len(m.experts[expert]) {
		return Part{}, fmt.Errorf("store: MoE module %q: not built by Checkpoint.Experts: %w", m.Prefix, ErrNotFound)
	}
	t := m.experts[expert][ri]
	return Part{DType: t.DType, Shape: slices.Clone(t.Shape), Data: t.data, Tensor: t.Name, Source: t.Source}, nil
}

// Experts indexes every routed expert among the checkpoint's current tensors
// (computed on each call). Two layouts are recognised, Prefix being
// everything before the first ".experts." in a name:
//
//  1. One tensor set per expert (Hub layout): "<prefix>.experts.<e>.<role>"
//     or "<prefix>.experts.expert_<e>.<role>", e.g.
//     "model.layers.0.block_sparse_moe.experts.3.w1.weight" (role
//     "w1.weight") or "encoder.block.1.layer.1.mlp.experts.expert_0.wi.weight".
//  2. Fused: "<prefix>.experts.<role>" where role does not start with a digit
//     or "expert_"; the tensor must have ndim >= 2 with dimension 0 = E, and
//     expert e is the contiguous slice [e], e.g.
//     "model.layers.0.mlp.experts.gate_up_proj" [E, 2I, H].
//
// Names with ".shared_experts." or ".shared_expert." do not match. The
// following are errors wrapping ErrExpertLayout, naming the module prefix
// and a tensor where there is one: a module mixing both layouts; expert ids
// that are not exactly 0..E-1 (or are malformed, e.g. "07", "3x"); an expert
// lacking a role that other experts have; a role whose shape or dtype
// differs across experts; a fused tensor with ndim < 2 or dimension 0 of 0;
// fused roles with different dimension 0. Returns ErrClosed after Close.
//
// Roles holding a quantized weight and its scales (FP8 block-scaled or
// MXFP4, see QuantFormat) are also paired into MoEModule.Quant; a role that
// looks quantized but does not fit is left plain and never fails Experts
// (MoEModule.QuantPart says why it is missing).
func (c *Checkpoint) Experts() (*ExpertIndex, error) {
	c.mu.RLock()
	if c.closed {
		c.mu.RUnlock()
		return nil, ErrClosed
	}
	ts := make([]*Tensor, 0, len(c.tensors))
	for _, t := range c.tensors {
		ts = append(ts, t)
	}
	c.mu.RUnlock()
	return buildExpertIndex(ts)
}

type moduleBuilder struct {
	prefix    string
	perExpert map[int]map[string]*Tensor
	fused     map[string]*Tensor
	anyPer    *Tensor // first per-expert tensor seen (for messages)
	anyFused  *Tensor // first fused tensor seen (for messages)
}

func layoutErr(t *Tensor, prefix, format string, args ...any) error {
	e := &FormatError{Msg: fmt.Sprintf("MoE module %q: ", prefix) + fmt.Sprintf(format, args...), err: ErrExpertLayout}
	if t != nil {
		e.Tensor = t.Name
		e.File = t.Source
	}
	return e
}

func buildExpertIndex(ts []*Tensor) (*ExpertIndex, error) {
	sort.Slice(ts, func(i, j int) bool { return ts[i].Name < ts[j].Name })
	mods := make(map[string]*moduleBuilder)
	for _, t := range ts {
		i := strings.Index(t.Name, expertsSegment)
		if i < 0 {
			continue
		}
		prefix, rest := t.Name[:i], t.Name[i+len(expertsSegment):]
		mb := mods[prefix]
		if mb == nil {
			mb = &moduleBuilder{prefix: prefix, perExpert: map[int]map[string]*Tensor{}, fused: map[string]*Tensor{}}
			mods[prefix] = mb
		}
		if id, role, per, err := splitExpertRest(rest); err != nil {
			return nil, layoutErr(t, prefix, "%s", err)
		} else if per {
			roles := mb.perExpert[id]
			if roles == nil {
				roles = map[string]*Tensor{}
				mb.perExpert[id] = roles
			}
			roles[role] = t // names are unique, so (id, role) is too
			if mb.anyPer == nil {
				mb.anyPer = t
			}
		} else {
			mb.fused[role] = t
			if mb.anyFused == nil {
				mb.anyFused = t
			}
		}
	}
	x := &ExpertIndex{}
	for _, mb := range mods {
		m, err := mb.build()
		if err != nil {
			return nil, err
		}
		m.indexQuant()
		x.Modules = append(x.Modules, m)
	}
	sort.Slice(x.Modules, func(i, j int) bool { return naturalLess(x.Modules[i].Prefix, x.Modules[j].Prefix) })
	return x, nil
}

// splitExpertRest splits the part of a name after ".experts.". per reports
// the per-expert layout (then id and role are set); otherwise role is the
// fused role.
func splitExpertRest(rest string) (id int, role string, per bool, err error) {
	idPart := rest
	switch {
	case strings.HasPrefix(rest, "expert_"):
		idPart = rest[len("expert_"):]
	case rest != "" && rest[0] >= '0' && rest[0] <= '9':
	default:
		if rest == "" {
			return 0, "", false, fmt.Errorf("empty role after %q", expertsSegment)
		}
		return 0, rest, false, nil
	}
	dot := strings.IndexByte(idPart, '.')
	if dot < 0 || dot == len(idPart)-1 {
		return 0, "", false, fmt.Errorf("expert tensor %q has no role after the expert id", rest)
	}
	digits := idPart[:dot]
	if digits == "" || !allDigits(digits) || (len(digits) > 1 && digits[0] == '0') {
		return 0, "", false, fmt.Errorf("malformed expert id %q", digits)
	}
	id, err = strconv.Atoi(digits)
	if err != nil {
		return 0, "", false, fmt.Errorf("expert id %q out of range", digits)
	}
	return id, idPart[dot+1:], true, nil
}

func (mb *moduleBuilder) build() (*MoEModule, error) {
	if len(mb.perExpert) > 0 && len(mb.fused) > 0 {
		return nil, layoutErr(mb.anyFused, mb.prefix, "mixes the fused layout (this tensor) with per-expert tensors (e.g. %q)", mb.anyPer.Name)
	}
	if len(mb.fused) > 0 {
		return mb.buildFused()
	}
	return mb.buildPerExpert()
}

func (mb *moduleBuilder) buildFused() (*MoEModule, error) {
	m := &MoEModule{Prefix: mb.prefix, Fused: true}
	for r := range mb.fused {
		m.Roles = append(m.Roles, r)
	}
	sort.Strings(m.Roles)
	var first *Tensor
	for _, r := range m.Roles {
		t := mb.fused[r]
		if len(t.Shape) < 2 {
			return nil, layoutErr(t, mb.prefix, "fused expert tensor (role %q) needs ndim >= 2 with dim 0 = number of experts, has shape %v", r, t.Shape)
		}
		if t.Shape[0] == 0 {
			return nil, layoutErr(t, mb.prefix, "fused expert tensor (role %q) has 0 experts (shape %v)", r, t.Shape)
		}
		if first == nil {
			first = t
		} else if t.Shape[0] != first.Shape[0] {
			return nil, layoutErr(t, mb.prefix, "fused role %q has %d experts (shape %v) but role %q has %d (shape %v)",
				r, t.Shape[0], t.Shape, m.Roles[0], first.Shape[0], first.Shape)
		}
		m.fused = append(m.fused, t)
	}
	m.NumExperts = int(first.Shape[0])
	return m, nil
}

func (mb *moduleBuilder) buildPerExpert() (*MoEModule, error) {
	m := &MoEModule{Prefix: mb.prefix}
	e := len(mb.perExpert)
	maxID := -1
	roleSet := map[string]*Tensor{}
	for id, roles := range mb.perExpert {
		maxID = max(maxID, id)
		for r, t := range roles {
			if old, ok := roleSet[r]; !ok || t.Name < old.Name {
				roleSet[r] = t
			}
		}
	}
	if maxID != e-1 {
		missing := 0
		for mb.perExpert[missing] != nil {
			missing++
		}
		return nil, layoutErr(nil, mb.prefix, "expert ids are not 0..%d: %d distinct ids, largest %d, expert %d missing", e-1, e, maxID, missing)
	}
	for r := range roleSet {
		m.Roles = append(m.Roles, r)
	}
	sort.Strings(m.Roles)
	m.NumExperts = e
	m.experts = make([][]*Tensor, e)
	for _, r := range m.Roles {
		ref := roleSet[r] // some expert's tensor for this role
		for id := 0; id < e; id++ {
			t, ok := mb.perExpert[id][r]
			if !ok {
				return nil, layoutErr(nil, mb.prefix, "expert %d has no role %q (other experts have it, e.g. %q)", id, r, ref.Name)
			}
			if t.DType != ref.DType || !slices.Equal(t.Shape, ref.Shape) {
				return nil, layoutErr(t, mb.prefix, "role %q is %s %v here but %s %v in %q", r, t.DType, t.Shape, ref.DType, ref.Shape, ref.Name)
			}
			m.experts[id] = append(m.experts[id], t)
		}
	}
	return m, nil
}

// naturalLess orders dot-separated names segment by segment, comparing
// segments that are both decimal numbers numerically; names that compare
// equal that way (e.g. "a.01" and "a.1") fall back to byte order, so the
// order is total.
func naturalLess(a, b string) bool {
	if c := naturalCompare(a, b); c != 0 {
		return c < 0
	}
	return a < b
}

func naturalCompare(a, b string) int {
	for {
		sa, ra, moreA := strings.Cut(a, ".")
		sb, rb, moreB := strings.Cut(b, ".")
		if c := compareSegment(sa, sb); c != 0 {
			return c
		}
		switch {
		case !moreA && !moreB:
			return 0
		case !moreA:
			return -1
		case !moreB:
			return 1
		}
		a, b = ra, rb
	}
}

func compareSegment(x, y string) int {
	if x != "" && y != "" && allDigits(x) && allDigits(y) {
		tx, ty := strings.TrimLeft(x, "0"), strings.TrimLeft(y, "0")
		if len(tx) != len(ty) {
			return len(tx) - len(ty)
		}
		if c := strings.Compare(tx, ty); c != 0 {
			return c
		}
	}
	return strings.Compare(x, y)
}
