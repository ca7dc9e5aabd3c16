// Package layout defines the byte image of one expert in a cache slot and
// fills it from checkpoint tensors.
//
// A slot holds one expert as a sequence of regions, each a dense row-major
// tensor that the compute path uses directly (for example "gate_up_proj"
// [2I, H] and "down_proj" [H, I]). A region is the concatenation along dim 0
// of one or more per-expert checkpoint parts (for example w1 then w3), which
// for row-major tensors is a plain byte concatenation — exactly how
// transformers fuses per-expert Hub tensors into gate_up_proj — converted to
// the region's dtype on the way.
package layout

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/moe-infinity/moe_infinity/go/dtype"
	"github.com/moe-infinity/moe_infinity/go/store"
	"github.com/moe-infinity/moe_infinity/go/strictjson"
)

// ErrCheckpoint marks errors about the checkpoint's expert tensors
// (dtype, shapes that cannot be laid out), as opposed to a bad spec.
var ErrCheckpoint = errors.New("checkpoint experts cannot be laid out")

// DefaultAlignment is the byte alignment of regions and slots when the spec
// sets none: 256 bytes suits CPU SIMD loads and GPU coalesced access.
const DefaultAlignment = 256

// RegionSpec asks for one region of the slot image.
type RegionSpec struct {
	// Name is the region's name as the compute path knows it.
	Name string `json:"name"`
	// Parts are the checkpoint roles (as store.MoEModule.Roles names
	// them) concatenated along dim 0, in order.
	Parts []string `json:"parts"`
	// DType is the region's element type ("float32", "bfloat16", "F16",
	// ...); empty keeps the first part's dtype.
	DType string `json:"dtype,omitempty"`
}

// Spec is the requested slot image.
type Spec struct {
	// Regions in slot order.
	Regions []RegionSpec `json:"regions"`
	// Alignment of every region offset and of the slot size, in bytes
	// (a power of two; 0 means DefaultAlignment).
	Alignment int64 `json:"alignment,omitempty"`
	// QuantMethod is the checkpoint's quantization_config.quant_method
	// ("fp8", "mxfp4"; QuantMethods) when its experts are quantized
	// (BuildQuantized); Build ignores it.
	QuantMethod string `json:"quant_method,omitempty"`
	// WeightBlockSize is quantization_config.weight_block_size, the
	// [rows, cols] in elements that share one FP8 scale (quant_method
	// "fp8").
	WeightBlockSize []int64 `json:"weight_block_size,omitempty"`
}

// ParseSpec decodes a JSON spec (one object, keys spelled exactly as the
// json tags, nothing after it: strictjson.Decode).
func ParseSpec(b []byte) (Spec, error) {
	var s Spec
	if err := strictjson.Decode(b, &s); err != nil {
		return Spec{}, fmt.Errorf("layout: bad spec JSON: %w", err)
	}
	return s, nil
}

// Region is one placed region of the slot image.
type Region struct {
	// Name as in the spec.
	Name string `json:"name"`
	// DType is the element type, as its torch name ("float32").
	DType string `json:"dtype"`
	// Shape of the region tensor (elements).
	Shape []int64 `json:"shape"`
	// Offset from the start of the slot, in bytes.
	Offset int64 `json:"offset"`
	// Bytes is the region's size in bytes (without padding).
	Bytes int64 `json:"bytes"`
	// Parts as in the spec.
	Parts []string `json:"parts"`

	dt dtype.DType
}

// Layout is a validated slot image shared by every MoE module.
type Layout struct {
	// Regions in slot order.
	Regions []Region `json:"regions"`
	// SlotBytes is the size of one slot in bytes (a multiple of Alignment).
	SlotBytes int64 `json:"slot_bytes"`
	// Alignment in bytes.
	Alignment int64 `json:"alignment"`
	// SourceBytes is the number of checkpoint bytes read to fill one slot.
	SourceBytes int64 `json:"source_bytes"`
}

func alignUp(n, a int64) int64 { return (n + a - 1) / a * a }

// Build places spec's regions and checks that every module provides the
// parts with consistent shapes, so that one slot size fits all experts.
func Build(spec Spec, mods []*store.MoEModule) (*Layout, error) {
	if len(mods) == 0 {
		return nil, fmt.Errorf("layout: no MoE modules to lay out")
	}
	if len(spec.Regions) == 0 {
		return nil, fmt.Errorf("layout: spec has no regions")
	}
	align := spec.Alignment
	if align == 0 {
		align = DefaultAlignment
	}
	if align < 0 || align&(align-1) != 0 {
		return nil, fmt.Errorf("layout: alignment %d is not a power of two", align)
	}
	var first *Layout
	for _, m := range mods {
		l, err := place(spec, align, m)
		if err != nil {
			return nil, err
		}
		if first == nil {
			first = l
			continue
		}
		if err := first.sameAs(l); err != nil {
			return nil, fmt.Errorf("%w: module %q differs from %q: %v", ErrCheckpoint, m.Prefix, mods[0].Prefix, err)
		}
	}
	return first, nil
}

func place(spec Spec, align int64, m *store.MoEModule) (*Layout, error) {
	l := &Layout{Alignment: align}
	seen := map[string]bool{}
	var off int64
	for _, rs := range spec.Regions {
		if err := checkRegionSpec(rs, seen); err != nil {
			return nil, err
		}
		r := Region{Name: rs.Name, Parts: append([]string(nil), rs.Parts...)}
		for i, role := range rs.Parts {
			p, err := m.Part(0, role)
			if err != nil {
				return nil, fmt.Errorf("layout: module %q: region %q: %w (roles present: %s)",
					m.Prefix, rs.Name, err, strings.Join(m.Roles, ", "))
			}
			if !p.DType.IsFloat() {
				return nil, fmt.Errorf("%w: %s: tensor %q has dtype %s; expert weights must be float32, float16 or bfloat16",
					ErrCheckpoint, p.Source, p.Tensor, p.DType)
			}
			if len(p.Shape) == 0 {
				return nil, fmt.Errorf("%w: %s: tensor %q is a scalar per expert", ErrCheckpoint, p.Source, p.Tensor)
			}
			if i == 0 {
				r.Shape = append([]int64(nil), p.Shape...)
				r.dt = p.DType
				continue
			}
			if len(p.Shape) != len(r.Shape) || !slices.Equal(p.Shape[1:], r.Shape[1:]) {
				return nil, fmt.Errorf("%w: %s: region %q: cannot concatenate tensor %q %v after shape %v along dim 0",
					ErrCheckpoint, p.Source, rs.Name, p.Tensor, p.Shape, r.Shape)
			}
			r.Shape[0] += p.Shape[0]
		}
		if rs.DType != "" {
			dt, err := dtype.Parse(rs.DType)
			if err != nil {
				return nil, fmt.Errorf("layout: region %q: %w", rs.Name, err)
			}
			if !dt.IsFloat() {
				return nil, fmt.Errorf("layout: region %q: dtype %s is not a float type", rs.Name, dt)
			}
			r.dt = dt
		}
		r.DType = r.dt.TorchName()
		n := int64(1)
		for _, d := range r.Shape {
			n *= d
		}
		r.Bytes = n * int64(r.dt.Size())
		off = alignUp(off, align)
		r.Offset = off
		off += r.Bytes
		l.Regions = append(l.Regions, r)
	}
	l.SlotBytes = alignUp(off, align)
	for _, r := range l.Regions {
		for _, role := range r.Parts {
			p, _ := m.Part(0, role)
			l.SourceBytes += p.NumBytes()
		}
	}
	return l, nil
}

// checkRegionSpec checks one region of a spec: named, not listed before
// (seen records the names so far) and with parts.
func checkRegionSpec(rs RegionSpec, seen map[string]bool) error {
	if rs.Name == "" {
		return fmt.Errorf("layout: region with empty name")
	}
	if seen[rs.Name] {
		return fmt.Errorf("layout: region %q listed twice", rs.Name)
	}
	seen[rs.Name] = true
	if len(rs.Parts) == 0 {
		return fmt.Errorf("layout: region %q has no parts", rs.Name)
	}
	return nil
}

func (l *Layout) sameAs(o *Layout) error {
	if l.SlotBytes != o.SlotBytes || len(l.Regions) != len(o.Regions) {
		return fmt.Errorf("slot of %d bytes vs %d", o.SlotBytes, l.SlotBytes)
	}
	for i := range l.Regions {
		a, b := l.Regions[i], o.Regions[i]
		if a.dt != b.dt || !slices.Equal(a.Shape, b.Shape) {
			return fmt.Errorf("region %q is %s%v vs %s%v", a.Name, b.DType, b.Shape, a.DType, a.Shape)
		}
	}
	return nil
}

// Fill writes expert e of module m into dst (at least SlotBytes long),
// converting dtypes as the layout says. Padding bytes are zeroed.
func (l *Layout) Fill(m *store.MoEModule, expert int, dst []byte) error {
	if int64(len(dst)) < l.SlotBytes {
		return fmt.Errorf("layout: destination of %d bytes is smaller than a slot (%d bytes)", len(dst), l.SlotBytes)
	}
	if expert < 0 || expert >= m.NumExperts {
		return fmt.Errorf("layout: module %q has no expert %d (it has %d)", m.Prefix, expert, m.NumExperts)
	}
	var prev int64
	for _, r := range l.Regions {
		clear(dst[prev:r.Offset])
		off := r.Offset
		for _, role := range r.Parts {
			p, err := m.Part(expert, role)
			if err != nil {
				return fmt.Errorf("layout: %w", err)
			}
			n := p.NumBytes() / int64(p.DType.Size()) * int64(r.dt.Size())
			if off+n > r.Offset+r.Bytes {
				return fmt.Errorf("layout: module %q expert %d: %s overflows region %q", m.Prefix, expert, p.Tensor, r.Name)
			}
			if p.DType == r.dt {
				copy(dst[off:off+n], p.Data) // as stored (also quantized bytes)
			} else if err := dtype.Convert(dst[off:off+n], r.dt, p.Data, p.DType); err != nil {
				return fmt.Errorf("layout: module %q expert %d: %s: %w", m.Prefix, expert, p.Tensor, err)
			}
			off += n
		}
		if off != r.Offset+r.Bytes {
			return fmt.Errorf("layout: module %q expert %d: region %q got %d bytes, want %d", m.Prefix, expert, r.Name, off-r.Offset, r.Bytes)
		}
		prev = off
	}
	clear(dst[prev:l.SlotBytes])
	return nil
}

// Segments describes expert e of module m as byte runs of the checkpoint
// (or host memory) to copy to the given slot offsets, when every part
// already has its region's dtype; ok is false when a conversion is needed.
func (l *Layout) Segments(m *store.MoEModule, expert int) (segs []Segment, ok bool) {
	if expert < 0 || expert >= m.NumExperts {
		return nil, false
	}
	for _, r := range l.Regions {
		off := r.Offset
		for _, role := range r.Parts {
			p, err := m.Part(expert, role)
			if err != nil || p.DType != r.dt {
				return nil, false
			}
			segs = append(segs, Segment{Offset: off, Data: p.Data})
			off += p.NumBytes()
		}
	}
	return segs, true
}

// Region returns the region called name, if any.
func (l *Layout) Region(name string) (Region, bool) {
	for _, r := range l.Regions {
		if r.Name == name {
			return r, true
		}
	}
	return Region{}, false
}

// JSON returns the layout as JSON (for the C ABI).
func (l *Layout) JSON() []byte {
	b, _ := json.Marshal(l)
	return b
}

// Segment is one byte range of an expert's slot image: Data (host memory,
// a view the source owns) goes at Offset bytes into the slot.
type Segment struct {
	// Offset in the slot, in bytes.
	Offset int64
	// Data is the host memory to copy (a view; the source owns it).
	Data []byte
}
