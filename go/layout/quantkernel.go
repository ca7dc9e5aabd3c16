package layout

import (
	"fmt"

	"github.com/moe-infinity/moe_infinity/go/dtype"
	"github.com/moe-infinity/moe_infinity/go/quant"
	"github.com/moe-infinity/moe_infinity/go/store"
)

// FP8Matrix locates one FP8 block-scaled matrix of an expert in the slot
// image, for kernels that read it in place.
type FP8Matrix struct {
	// Weight is the byte offset of the matrix's first row (float8_e4m3fn,
	// one byte per element, row-major).
	Weight int64
	// Scale is the byte offset of its float32 scale grid (row-major) and
	// ScaleBytes the grid's size in bytes (in host memory, the grid is a
	// tensor of its own: mapped mode reads it there).
	Scale, ScaleBytes int64
	// Row0 is the matrix's first row in that grid (the up half of a fused
	// gate_up weight starts at Inter; otherwise 0).
	Row0 int64
}

// FP8Kernel is how expert kernels read FP8 block-scaled SwiGLU experts
// straight from the slot image: gate and up [Inter, Hidden], down
// [Hidden, Inter], each with its scale grid.
type FP8Kernel struct {
	// Block is the checkpoint's weight_block_size.
	Block quant.Block
	// Hidden and Inter are the FFN sizes.
	Hidden, Inter int64
	// Gate, Up and Down locate the three matrices.
	Gate, Up, Down FP8Matrix
}

// FP8Kernel describes the FP8 experts' view regions gateUp ([2I, H]: gate
// rows, then up rows) and down ([H, I]) as kernels read them from the slot
// image, or says why kernels cannot: the format is not FP8, a region is not
// made of FP8 weights alone, or the scales are not float32.
func (v *Views) FP8Kernel(gateUp, down string) (FP8Kernel, error) {
	if v.Method != store.FP8Block.String() {
		return FP8Kernel{}, fmt.Errorf("the expert kernels read FP8 block-scaled experts, not %s", v.Method)
	}
	parts := func(name string) ([]viewPart, Region, error) {
		for i, r := range v.Layout.Regions {
			if r.Name == name {
				return v.parts[i], r, nil
			}
		}
		return nil, Region{}, fmt.Errorf("the expert kernels need a %q region", name)
	}
	// matrix locates part p's rows from row0 on. (The regions' shapes
	// are the parts' concatenation, so columns and row counts fit.)
	matrix := func(region string, p viewPart, row0 int64) (FP8Matrix, error) {
		if p.q == nil {
			return FP8Matrix{}, fmt.Errorf("region %q mixes FP8 and unquantized parts; the expert kernels read one format", region)
		}
		w, s := v.slot.Regions[p.src], v.slot.Regions[p.scales]
		if s.dt != dtype.F32 {
			return FP8Matrix{}, fmt.Errorf("the FP8 scales %q are %s; the expert kernels read float32 weight_scale_inv", s.Name, s.DType)
		}
		return FP8Matrix{Weight: w.Offset + row0*p.q.Cols, Scale: s.Offset, ScaleBytes: s.Bytes, Row0: row0}, nil
	}
	k := FP8Kernel{Block: v.block}
	gp, gr, err := parts(gateUp)
	if err != nil {
		return FP8Kernel{}, err
	}
	dp, dr, err := parts(down)
	if err != nil {
		return FP8Kernel{}, err
	}
	if len(gr.Shape) != 2 || len(dr.Shape) != 2 || gr.Shape[0]%2 != 0 {
		return FP8Kernel{}, fmt.Errorf("the expert kernels need %s [2I, H] and %s [H, I] (got %v and %v)", gateUp, down, gr.Shape, dr.Shape)
	}
	k.Hidden, k.Inter = gr.Shape[1], gr.Shape[0]/2
	if len(dp) != 1 {
		return FP8Kernel{}, fmt.Errorf("region %q is made of %d weights; the expert kernels read one", down, len(dp))
	}
	switch len(gp) {
	case 1: // one fused [2I, H] weight with one grid
		if k.Gate, err = matrix(gateUp, gp[0], 0); err == nil {
			k.Up, err = matrix(gateUp, gp[0], k.Inter)
		}
	case 2: // gate_proj and up_proj, each [I, H] with its grid
		if k.Gate, err = matrix(gateUp, gp[0], 0); err == nil && gp[0].q.Rows != k.Inter {
			err = fmt.Errorf("region %q: FP8 weight %q has %d rows, not %d", gateUp, gp[0].q.Name, gp[0].q.Rows, k.Inter)
		}
		if err == nil {
			k.Up, err = matrix(gateUp, gp[1], 0)
		}
	default:
		err = fmt.Errorf("region %q is made of %d weights; the expert kernels read gate and up from one or two", gateUp, len(gp))
	}
	if err != nil {
		return FP8Kernel{}, err
	}
	if dr.Shape[0] != k.Hidden || dr.Shape[1] != k.Inter {
		return FP8Kernel{}, fmt.Errorf("the expert kernels need %s [H, I] = [%d, %d] (got %v)", down, k.Hidden, k.Inter, dr.Shape)
	}
	if k.Down, err = matrix(down, dp[0], 0); err != nil {
		return FP8Kernel{}, err
	}
	return k, nil
}
