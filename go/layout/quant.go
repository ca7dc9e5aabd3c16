package layout

import (
	"fmt"
	"slices"
	"strings"

	"github.com/moe-infinity/moe_infinity/go/dtype"
	"github.com/moe-infinity/moe_infinity/go/quant"
	"github.com/moe-infinity/moe_infinity/go/store"
)

// Quantized experts. A checkpoint that ships its experts quantized (FP8
// block-scaled, MXFP4; store.QuantFormat) is served from two images:
//
//   - the slot image (Layout): what a cache slot holds, the checkpoint's
//     own bytes for every part the spec names — the quantized values and
//     their scales, plain parts (biases) as stored — so loading an expert
//     is a plain copy of its pages and nothing is dequantized in RAM;
//   - the view image (Views.Layout): the regions the spec asks for, in
//     its dtype, as the caller's expert code reads them (gate_up_proj
//     [2I, H] bfloat16, ...). Views.Expand fills one from a slot image,
//     dequantizing bit for bit as transformers does (package quant).

// QuantMethods lists the Spec.QuantMethod values (quantization_config's
// quant_method) whose experts can be served.
var QuantMethods = []string{"fp8", "mxfp4"}

// Quantized reports whether the spec names a quantized weight of m as a
// part: a role that is the weight role of one of m's quantized weights,
// or its name (the fused "gate_up_proj" of gate_up_proj_blocks and
// gate_up_proj_scales).
func Quantized(spec Spec, m *store.MoEModule) bool {
	for _, r := range spec.Regions {
		for _, p := range r.Parts {
			if _, ok := quantFor(m, p); ok {
				return true
			}
		}
	}
	return false
}

// quantFor returns m's quantized weight whose weight role or name is role.
func quantFor(m *store.MoEModule, role string) (store.QuantWeight, bool) {
	for _, q := range m.Quant {
		if q.WeightRole == role || q.Name == role {
			return q, true
		}
	}
	return store.QuantWeight{}, false
}

// viewPart is how one part of a view region is made from the slot image.
type viewPart struct {
	off, bytes int64              // in the view image
	q          *store.QuantWeight // nil: a plain part, converted
	src        int                // slot region of the values (plain part or quantized weight)
	scales     int                // slot region of the scales (quantized)
}

// Views is the image the caller's expert code reads for quantized experts
// (see the package comment on quantized experts).
type Views struct {
	// Layout is the view image: the spec's regions in its dtypes. Its
	// SourceBytes is the slot image's (the checkpoint bytes of one expert).
	Layout *Layout
	// Method is the quant_method served ("fp8" or "mxfp4").
	Method string

	slot  *Layout
	block quant.Block
	parts [][]viewPart // per view region
}

// BuildQuantized places the slot image and the view image of spec for
// modules whose experts are quantized. spec.QuantMethod must name the
// checkpoint's format ("fp8" needs spec.WeightBlockSize), every region a
// float dtype, and every module the same shapes. A quantized weight of
// the "fp8" format becomes [rows, cols] as stored; an "mxfp4" one the
// transpose [cols, rows], as transformers dequantizes gpt-oss experts.
func BuildQuantized(spec Spec, mods []*store.MoEModule) (*Layout, *Views, error) {
	if len(mods) == 0 {
		return nil, nil, fmt.Errorf("layout: no MoE modules to lay out")
	}
	if len(spec.Regions) == 0 {
		return nil, nil, fmt.Errorf("layout: spec has no regions")
	}
	align := spec.Alignment
	if align == 0 {
		align = DefaultAlignment
	}
	if align < 0 || align&(align-1) != 0 {
		return nil, nil, fmt.Errorf("layout: alignment %d is not a power of two", align)
	}
	var block quant.Block
	switch spec.QuantMethod {
	case "fp8":
		if len(spec.WeightBlockSize) != 2 || spec.WeightBlockSize[0] <= 0 || spec.WeightBlockSize[1] <= 0 {
			return nil, nil, fmt.Errorf("layout: quant_method \"fp8\" needs weight_block_size [rows, cols] of two positive sizes (got %v); per-tensor FP8 is not supported", spec.WeightBlockSize)
		}
		block = quant.Block{Rows: int(spec.WeightBlockSize[0]), Cols: int(spec.WeightBlockSize[1])}
	case "mxfp4":
	default:
		return nil, nil, fmt.Errorf("layout: the experts are quantized but quant_method is %q (supported: %s)", spec.QuantMethod, strings.Join(QuantMethods, ", "))
	}
	var first *Views
	for _, m := range mods {
		v, err := placeQuantized(spec, align, block, m)
		if err != nil {
			return nil, nil, err
		}
		if first == nil {
			first = v
			continue
		}
		if err := first.slot.sameAs(v.slot); err != nil {
			return nil, nil, fmt.Errorf("%w: module %q differs from %q: %v", ErrCheckpoint, m.Prefix, mods[0].Prefix, err)
		}
		if err := first.Layout.sameAs(v.Layout); err != nil {
			return nil, nil, fmt.Errorf("%w: module %q differs from %q: %v", ErrCheckpoint, m.Prefix, mods[0].Prefix, err)
		}
	}
	return first.slot, first, nil
}

func placeQuantized(spec Spec, align int64, block quant.Block, m *store.MoEModule) (*Views, error) {
	slot := &Layout{Alignment: align}
	view := &Layout{Alignment: align}
	v := &Views{Layout: view, Method: spec.QuantMethod, slot: slot, block: block}
	slotIdx := map[string]int{}
	var slotOff int64
	// addSlot places role in the slot image (once) and returns its index.
	addSlot := func(role string) (int, error) {
		if i, ok := slotIdx[role]; ok {
			return i, nil
		}
		p, err := m.Part(0, role)
		if err != nil {
			return 0, fmt.Errorf("layout: module %q: %w (roles present: %s)", m.Prefix, err, strings.Join(m.Roles, ", "))
		}
		slotOff = alignUp(slotOff, align)
		r := Region{Name: role, DType: p.DType.TorchName(), Shape: p.Shape, Offset: slotOff, Bytes: p.NumBytes(), Parts: []string{role}, dt: p.DType}
		slotOff += r.Bytes
		slot.Regions = append(slot.Regions, r)
		slot.SourceBytes += r.Bytes
		slotIdx[role] = len(slot.Regions) - 1
		return slotIdx[role], nil
	}
	seen := map[string]bool{}
	var viewOff int64
	for _, rs := range spec.Regions {
		if err := checkRegionSpec(rs, seen); err != nil {
			return nil, err
		}
		if rs.DType == "" {
			return nil, fmt.Errorf("layout: region %q: a region of quantized experts needs a dtype (the one transformers dequantizes to)", rs.Name)
		}
		dt, err := dtype.Parse(rs.DType)
		if err != nil {
			return nil, fmt.Errorf("layout: region %q: %w", rs.Name, err)
		}
		if !dt.IsFloat() {
			return nil, fmt.Errorf("layout: region %q: dtype %s is not a float type", rs.Name, dt)
		}
		r := Region{Name: rs.Name, Parts: append([]string(nil), rs.Parts...), dt: dt, DType: dt.TorchName()}
		var parts []viewPart
		for i, role := range rs.Parts {
			var shape []int64
			var vp viewPart
			if q, ok := quantFor(m, role); ok {
				if err := checkQuant(q, spec.QuantMethod, block, m); err != nil {
					return nil, err
				}
				qq := q
				vp.q = &qq
				if vp.src, err = addSlot(q.WeightRole); err != nil {
					return nil, err
				}
				if vp.scales, err = addSlot(q.ScaleRole); err != nil {
					return nil, err
				}
				shape = []int64{q.Rows, q.Cols}
				if q.Format == store.MXFP4 {
					shape = []int64{q.Cols, q.Rows}
				}
			} else {
				p, err := m.Part(0, role)
				if err != nil {
					return nil, fmt.Errorf("layout: module %q: region %q: %w (roles present: %s)", m.Prefix, rs.Name, err, strings.Join(m.Roles, ", "))
				}
				if !p.DType.IsFloat() {
					return nil, fmt.Errorf("%w: %s: tensor %q has dtype %s and is not a quantized weight with scales; expert weights must be float32, float16, bfloat16 or quantized (%s)",
						ErrCheckpoint, p.Source, p.Tensor, p.DType, strings.Join(QuantMethods, ", "))
				}
				if len(p.Shape) == 0 {
					return nil, fmt.Errorf("%w: %s: tensor %q is a scalar per expert", ErrCheckpoint, p.Source, p.Tensor)
				}
				if vp.src, err = addSlot(role); err != nil {
					return nil, err
				}
				shape = p.Shape
			}
			if i == 0 {
				r.Shape = append([]int64(nil), shape...)
			} else {
				if len(shape) != len(r.Shape) || !slices.Equal(shape[1:], r.Shape[1:]) {
					return nil, fmt.Errorf("%w: module %q: region %q: cannot concatenate part %q %v after shape %v along dim 0",
						ErrCheckpoint, m.Prefix, rs.Name, role, shape, r.Shape)
				}
				r.Shape[0] += shape[0]
			}
			n := int64(1)
			for _, d := range shape {
				n *= d
			}
			vp.bytes = n * int64(dt.Size())
			parts = append(parts, vp)
		}
		viewOff = alignUp(viewOff, align)
		r.Offset = viewOff
		for i := range parts {
			parts[i].off = viewOff
			viewOff += parts[i].bytes
		}
		r.Bytes = viewOff - r.Offset
		view.Regions = append(view.Regions, r)
		v.parts = append(v.parts, parts)
	}
	slot.SlotBytes = alignUp(slotOff, align)
	view.SlotBytes = alignUp(viewOff, align)
	view.SourceBytes = slot.SourceBytes
	return v, nil
}

// checkQuant checks that q is of the spec's format, and an FP8 weight's
// scale grid that of the block size.
func checkQuant(q store.QuantWeight, method string, block quant.Block, m *store.MoEModule) error {
	if q.Format.String() != method {
		return fmt.Errorf("%w: module %q: weight %q is %s but quantization_config.quant_method is %q", ErrCheckpoint, m.Prefix, q.Name, q.Format, method)
	}
	if q.Format == store.FP8Block {
		if err := q.CheckFP8Block(int64(block.Rows), int64(block.Cols)); err != nil {
			return fmt.Errorf("%w: module %q: %v", ErrCheckpoint, m.Prefix, err)
		}
	}
	return nil
}

// Expand writes the view image of one expert into dst (at least
// Layout.SlotBytes long) from its slot image slot (at least the slot
// layout's SlotBytes): quantized parts dequantized as transformers does,
// plain parts converted to the region's dtype. Padding bytes are zeroed.
func (v *Views) Expand(slot, dst []byte) error {
	if int64(len(slot)) < v.slot.SlotBytes {
		return fmt.Errorf("layout: slot image of %d bytes, want %d", len(slot), v.slot.SlotBytes)
	}
	if int64(len(dst)) < v.Layout.SlotBytes {
		return fmt.Errorf("layout: view of %d bytes is smaller than the view image (%d bytes)", len(dst), v.Layout.SlotBytes)
	}
	region := func(i int) (Region, []byte) {
		r := v.slot.Regions[i]
		return r, slot[r.Offset : r.Offset+r.Bytes]
	}
	var prev int64
	for ri, r := range v.Layout.Regions {
		clear(dst[prev:r.Offset])
		for _, p := range v.parts[ri] {
			out := dst[p.off : p.off+p.bytes]
			sr, src := region(p.src)
			var err error
			switch {
			case p.q == nil:
				err = dtype.Convert(out, r.dt, src, sr.dt)
			case p.q.Format == store.FP8Block:
				scr, scales := region(p.scales)
				err = quant.DequantFP8Block(out, r.dt, src, scales, scr.dt, int(p.q.Rows), int(p.q.Cols), v.block)
			default:
				_, scales := region(p.scales)
				err = quant.DequantMXFP4Transposed(out, r.dt, src, scales, int(p.q.Rows), int(p.q.Cols))
			}
			if err != nil {
				return fmt.Errorf("layout: region %q from %q: %w", r.Name, sr.Name, err)
			}
		}
		prev = r.Offset + r.Bytes
	}
	clear(dst[prev:v.Layout.SlotBytes])
	return nil
}
