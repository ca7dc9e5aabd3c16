package backend

import (
	"encoding/binary"
	"fmt"
	"math"

	"github.com/moe-infinity/moe_infinity/go/dtype"
)

// FP8Args describe experts whose gate, up and down weights are FP8
// block-scaled (quant_method "fp8"; DeepSeek-V3/R1, Qwen3-*-FP8): each
// matrix is float8_e4m3fn, one byte per element, row-major as stored
// ([Inter, Hidden] gate and up, [Hidden, Inter] down), with a float32
// weight_scale_inv grid [ceil(rows/BlockRows), ceil(cols/BlockCols)],
// row-major, reached through tables of grid addresses beside the tables of
// rows (FFNArgs.GateUp, Up, Down): inside the expert's slot, or (mapped
// mode) wherever the checkpoint keeps the grid in host memory.
//
// Each weight element is dequantized as transformers dequantizes the
// checkpoint (package quant): its fp8 value times its block's scale in
// float32, rounded to the activation dtype; the FFN then runs as on
// bfloat16/float16 experts. So the kernels' arithmetic is the dequantized
// host path's, with the weights read compressed.
type FP8Args struct {
	// BlockRows and BlockCols are the checkpoint's weight_block_size.
	BlockRows, BlockCols int64
	// GateScale[e], UpScale[e] and DownScale[e] are the addresses of
	// expert e's scale grids, indexed like the row tables (a backend's
	// mapped FFN fills them from its own tables).
	GateScale, UpScale, DownScale []uint64
	// UpRow0 is the up matrix's first row in its scale grid: Inter when
	// gate and up are the halves of one fused weight [2·Inter, Hidden]
	// sharing one grid (GateScale[e] == UpScale[e]), 0 when each has its
	// own.
	UpRow0 int64
}

// CheckBlock checks the block and the up matrix's place in its grid, for
// an intermediate size of inter (what a mapped call, whose tables are the
// backend's, is checked for).
func (q *FP8Args) CheckBlock(inter int64) error {
	if q.BlockRows <= 0 || q.BlockCols <= 0 {
		return fmt.Errorf("expert FFN: FP8 weight_block_size [%d, %d] must be positive", q.BlockRows, q.BlockCols)
	}
	if q.UpRow0 != 0 && q.UpRow0 != inter {
		return fmt.Errorf("expert FFN: FP8 up rows start at row %d of their scale grid (want 0 or inter = %d)", q.UpRow0, inter)
	}
	return nil
}

// validate checks the block (CheckBlock) and the scale tables (n
// experts).
func (q *FP8Args) validate(inter int64, n int) error {
	if err := q.CheckBlock(inter); err != nil {
		return err
	}
	if len(q.GateScale) != n || len(q.UpScale) != n || len(q.DownScale) != n {
		return fmt.Errorf("expert FFN: FP8 scale tables of %d, %d and %d experts (want %d, as the row tables)", len(q.GateScale), len(q.UpScale), len(q.DownScale), n)
	}
	return nil
}

// has reports whether expert e's three scale grids are set.
func (q *FP8Args) has(e int64) bool {
	return q.GateScale[e] != 0 && q.UpScale[e] != 0 && q.DownScale[e] != 0
}

// scaleCols is the number of scales per grid row of a matrix of n columns.
func (q *FP8Args) scaleCols(n int64) int64 { return (n + q.BlockCols - 1) / q.BlockCols }

// fp8Dot returns the dot product of row `row` of the FP8 matrix at addr
// (len(v) columns; scale grid at sAddr, its rows counted from row0) with
// v: float32 accumulation in index order over the weights dequantized and
// rounded to dt, as dotRow over the dequantized matrix.
func fp8Dot(q *FP8Args, addr, sAddr uint64, row0, row int64, v []float32, dt dtype.DType) float32 {
	n := int64(len(v))
	sc := q.scaleCols(n)
	w := hostSlice(addr+uint64(row*n), n)
	s := hostSlice(sAddr+uint64(((row0+row)/q.BlockRows)*sc*4), sc*4)
	var acc float32
	for c0 := int64(0); c0 < n; c0 += q.BlockCols {
		scale := math.Float32frombits(binary.LittleEndian.Uint32(s[4*(c0/q.BlockCols):]))
		for c := c0; c < min(c0+q.BlockCols, n); c++ {
			acc += round(dtype.F8E4M3ToF32(w[c])*scale, dt) * v[c]
		}
	}
	return acc
}
