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
	ops   []ExpandOp   // the parts' program, in view order
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
	v.ops = v.program()
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

// ExpandKind says how an ExpandOp makes its part of a view.
type ExpandKind int

const (
	// ExpandConvert converts a plain part (a bias, say) between float
	// dtypes (dtype.Convert: round to nearest even).
	ExpandConvert ExpandKind = iota
	// ExpandFP8Block dequantizes a float8_e4m3fn weight [Rows, Cols] with
	// its block-scaled grid (quant.DequantFP8Block).
	ExpandFP8Block
	// ExpandMXFP4T dequantizes an MXFP4 weight [Rows, Cols] into its
	// transpose [Cols, Rows] (quant.DequantMXFP4Transposed).
	ExpandMXFP4T
)

// ExpandOp is one part of a view image made from the slot image: the
// program Expand runs, and that a backend holding the views elsewhere (in
// device memory) runs with its own kernels. Offsets and sizes are bytes,
// in the slot image (Src, Scales) and in the view image (Dst). Padding
// between parts is not written by any op (Expand zeroes it).
type ExpandOp struct {
	// Kind is the operation.
	Kind ExpandKind
	// Dst, DstBytes: the part in the view; DstType its dtype (F32, BF16
	// or F16).
	Dst, DstBytes int64
	DstType       dtype.DType
	// Src, SrcBytes: the values in the slot; SrcType their dtype for
	// ExpandConvert (the quantized formats have one).
	Src, SrcBytes int64
	SrcType       dtype.DType
	// Scales, ScalesBytes: the scales in the slot (quantized kinds);
	// ScaleType their dtype (F32 or BF16 for FP8; e8m0 bytes for MXFP4).
	Scales, ScalesBytes int64
	ScaleType           dtype.DType
	// Rows, Cols: the quantized weight's shape as stored.
	Rows, Cols int64
	// BlockRows, BlockCols: the FP8 weight_block_size.
	BlockRows, BlockCols int64
}

// Ops returns the program that makes one expert's view image from its
// slot image, in view order (the caller must not modify it).
func (v *Views) Ops() []ExpandOp { return v.ops }

// program lists the ops of v's parts.
func (v *Views) program() []ExpandOp {
	var ops []ExpandOp
	for ri, r := range v.Layout.Regions {
		for _, p := range v.parts[ri] {
			sr := v.slot.Regions[p.src]
			op := ExpandOp{Kind: ExpandConvert, Dst: p.off, DstBytes: p.bytes, DstType: r.dt, Src: sr.Offset, SrcBytes: sr.Bytes, SrcType: sr.dt}
			if p.q != nil {
				sc := v.slot.Regions[p.scales]
				op.Kind, op.Rows, op.Cols = ExpandMXFP4T, p.q.Rows, p.q.Cols
				op.Scales, op.ScalesBytes, op.ScaleType = sc.Offset, sc.Bytes, sc.dt
				if p.q.Format == store.FP8Block {
					op.Kind, op.BlockRows, op.BlockCols = ExpandFP8Block, int64(v.block.Rows), int64(v.block.Cols)
				}
			}
			ops = append(ops, op)
		}
	}
	return ops
}

// Run performs op on the CPU: reads slot (a slot image), writes its part
// of dst (a view image).
func (op ExpandOp) Run(slot, dst []byte) error {
	if op.Dst < 0 || op.Dst+op.DstBytes > int64(len(dst)) || op.Src < 0 || op.Src+op.SrcBytes > int64(len(slot)) ||
		op.Scales < 0 || op.Scales+op.ScalesBytes > int64(len(slot)) {
		return fmt.Errorf("layout: expand op %+v outside a slot image of %d bytes or a view of %d", op, len(slot), len(dst))
	}
	out, src := dst[op.Dst:op.Dst+op.DstBytes], slot[op.Src:op.Src+op.SrcBytes]
	scales := slot[op.Scales : op.Scales+op.ScalesBytes]
	switch op.Kind {
	case ExpandConvert:
		return dtype.Convert(out, op.DstType, src, op.SrcType)
	case ExpandFP8Block:
		return quant.DequantFP8Block(out, op.DstType, src, scales, op.ScaleType, int(op.Rows), int(op.Cols),
			quant.Block{Rows: int(op.BlockRows), Cols: int(op.BlockCols)})
	case ExpandMXFP4T:
		return quant.DequantMXFP4Transposed(out, op.DstType, src, scales, int(op.Rows), int(op.Cols))
	}
	return fmt.Errorf("layout: unknown expand op kind %d", op.Kind)
}

// Expand writes the view image of one expert into dst (at least
// Layout.SlotBytes long) from its slot image slot (at least the slot
// layout's SlotBytes): quantized parts dequantized as transformers does,
// plain parts converted to the region's dtype (the ops of Ops, run on the
// CPU). Padding bytes are zeroed.
func (v *Views) Expand(slot, dst []byte) error {
	if int64(len(slot)) < v.slot.SlotBytes {
		return fmt.Errorf("layout: slot image of %d bytes, want %d", len(slot), v.slot.SlotBytes)
	}
	if int64(len(dst)) < v.Layout.SlotBytes {
		return fmt.Errorf("layout: view of %d bytes is smaller than the view image (%d bytes)", len(dst), v.Layout.SlotBytes)
	}
	var prev int64
	for _, op := range v.ops {
		clear(dst[prev:op.Dst])
		if err := op.Run(slot, dst); err != nil {
			return fmt.Errorf("layout: view bytes [%d, %d): %w", op.Dst, op.Dst+op.DstBytes, err)
		}
		prev = op.Dst + op.DstBytes
	}
	clear(dst[prev:v.Layout.SlotBytes])
	return nil
}
