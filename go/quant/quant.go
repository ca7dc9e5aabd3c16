// Package quant dequantizes the quantized expert weights that checkpoints
// ship, on the CPU, bit for bit as transformers does when it loads them with
// dequantize=True:
//
//   - FP8 block-scaled (DeepSeek-V3/R1, Qwen3-*-FP8; quant_method "fp8"):
//     a float8_e4m3fn weight [rows, cols] and a float32 weight_scale_inv
//     [ceil(rows/block.Rows), ceil(cols/block.Cols)]; each element is its fp8
//     value times its block's scale, multiplied in float32, then rounded to
//     the output dtype.
//   - MXFP4 (gpt-oss; quant_method "mxfp4"): uint8 blocks [rows, cols/32, 16]
//     holding two e2m1 values per byte (low nibble first) and uint8 e8m0
//     scales [rows, cols/32]; each element is its e2m1 value times
//     2^(scale-127), rounded to the output dtype.
//
// Outputs are little-endian F32, BF16 or F16 bytes. Rounding to BF16 and F16
// is round to nearest, ties to even (dtype.F32BitsToBF16, dtype.F32BitsToF16).
//
// QuantFP8Block is the inverse: it compresses a float weight into the FP8
// block-scaled form DequantFP8Block reads, as DeepSeek's conversion does.
package quant

import (
	"encoding/binary"
	"fmt"
	"math"

	"github.com/moe-infinity/moe_infinity/go/dtype"
)

// MXFP4BlockSize is the number of values sharing one e8m0 scale in MXFP4.
const MXFP4BlockSize = 32

// Block is an FP8 checkpoint's weight_block_size: the number of weight rows
// (output features) and columns (input features) that share one scale.
type Block struct {
	// Rows is the block height in elements (weight_block_size[0]).
	Rows int
	// Cols is the block width in elements (weight_block_size[1]).
	Cols int
}

// ScaleGrid returns the shape of the scale tensor for a [rows, cols] weight:
// [ceil(rows/b.Rows), ceil(cols/b.Cols)]. b must have positive sides.
func (b Block) ScaleGrid(rows, cols int) (int, int) {
	return ceilDiv(rows, b.Rows), ceilDiv(cols, b.Cols)
}

// ceilDiv returns ceil(a/b) for a >= 0, b > 0 without overflowing.
func ceilDiv(a, b int) int {
	if a == 0 {
		return 0
	}
	return (a-1)/b + 1
}

// store writes float32 values into dst as dstT, little-endian.
type storer func(dst []byte, i int, v float32)

func storerFor(dstT dtype.DType) (storer, error) {
	le := binary.LittleEndian
	switch dstT {
	case dtype.F32:
		return func(d []byte, i int, v float32) { le.PutUint32(d[4*i:], math.Float32bits(v)) }, nil
	case dtype.BF16:
		return func(d []byte, i int, v float32) { le.PutUint16(d[2*i:], dtype.F32BitsToBF16(math.Float32bits(v))) }, nil
	case dtype.F16:
		return func(d []byte, i int, v float32) { le.PutUint16(d[2*i:], dtype.F32BitsToF16(math.Float32bits(v))) }, nil
	}
	return nil, fmt.Errorf("quant: output dtype %s not supported (want F32, BF16 or F16)", dstT)
}

// checkDst validates the output dtype and buffer for n elements.
func checkDst(dst []byte, dstT dtype.DType, n int) (storer, error) {
	st, err := storerFor(dstT)
	if err != nil {
		return nil, err
	}
	if len(dst) != n*dstT.Size() {
		return nil, fmt.Errorf("quant: output is %d bytes, %d %s elements need %d", len(dst), n, dstT, n*dstT.Size())
	}
	return st, nil
}

// DequantFP8Block dequantizes one block-scaled float8_e4m3fn weight of shape
// [rows, cols] (row-major, one byte per element) into dst as dstT (F32, BF16
// or F16; len(dst) = rows*cols*dstT.Size()). scaleInv holds the
// weight_scale_inv grid [ceil(rows/block.Rows), ceil(cols/block.Cols)],
// row-major, as little-endian scaleT elements (F32 as checkpoints ship it;
// BF16 is accepted too). The last block row and column may be partial.
//
// Element (r, c) becomes float32(w[r, c]) * scaleInv[r/block.Rows,
// c/block.Cols], one float32 multiplication, rounded to dstT: what
// transformers' Fp8Dequantize produces. fp8 NaN (0x7F, 0xFF) gives NaN.
// Sizes that do not match give an error and leave dst untouched.
func DequantFP8Block(dst []byte, dstT dtype.DType, w []byte, scaleInv []byte, scaleT dtype.DType, rows, cols int, block Block) error {
	if rows < 0 || cols < 0 {
		return fmt.Errorf("quant: FP8 weight shape [%d, %d] is negative", rows, cols)
	}
	if block.Rows <= 0 || block.Cols <= 0 {
		return fmt.Errorf("quant: FP8 weight_block_size [%d, %d] must be positive", block.Rows, block.Cols)
	}
	n := rows * cols
	if len(w) != n {
		return fmt.Errorf("quant: FP8 weight is %d bytes, shape [%d, %d] needs %d", len(w), rows, cols, n)
	}
	if scaleT != dtype.F32 && scaleT != dtype.BF16 {
		return fmt.Errorf("quant: FP8 weight_scale_inv dtype %s not supported (want F32 or BF16)", scaleT)
	}
	sr, sc := block.ScaleGrid(rows, cols)
	if len(scaleInv) != sr*sc*scaleT.Size() {
		return fmt.Errorf("quant: FP8 weight_scale_inv is %d bytes, the [%d, %d] grid of %s for weight [%d, %d] with block [%d, %d] needs %d",
			len(scaleInv), sr, sc, scaleT, rows, cols, block.Rows, block.Cols, sr*sc*scaleT.Size())
	}
	st, err := checkDst(dst, dstT, n)
	if err != nil {
		return err
	}
	scale := func(i int) float32 {
		if scaleT == dtype.F32 {
			return math.Float32frombits(binary.LittleEndian.Uint32(scaleInv[4*i:]))
		}
		return math.Float32frombits(dtype.BF16ToF32Bits(binary.LittleEndian.Uint16(scaleInv[2*i:])))
	}
	for r := 0; r < rows; r++ {
		srow := (r / block.Rows) * sc
		row := w[r*cols : (r+1)*cols]
		for c0 := 0; c0 < cols; c0 += block.Cols {
			s := scale(srow + c0/block.Cols)
			c1 := min(c0+block.Cols, cols)
			for c := c0; c < c1; c++ {
				st(dst, r*cols+c, dtype.F8E4M3ToF32(row[c])*s)
			}
		}
	}
	return nil
}

// DequantMXFP4 dequantizes one MXFP4 weight of shape [rows, cols] into dst
// as dstT (F32, BF16 or F16; len(dst) = rows*cols*dstT.Size()), row-major
// [rows, cols]. cols must be a multiple of MXFP4BlockSize (32). blocks holds
// rows*cols/2 bytes ([rows, cols/32, 16]): element 2k of a row is the low
// nibble of the row's byte k and element 2k+1 the high nibble. scales holds
// one e8m0 byte per 32 elements ([rows, cols/32]).
//
// Element value = e2m1 × 2^(scale-127), exact in float32, rounded to dstT
// (products beyond the dtype's range become ±Inf, as in transformers). A
// scale byte of 255 (NaN in e8m0) is an error, as are sizes that do not
// match; dst is then untouched.
func DequantMXFP4(dst []byte, dstT dtype.DType, blocks, scales []byte, rows, cols int) error {
	return dequantMXFP4(dst, dstT, blocks, scales, rows, cols, false)
}

// DequantMXFP4Transposed is DequantMXFP4 writing the transpose, [cols, rows]
// row-major: the orientation transformers' convert_moe_packed_tensors gives
// gpt-oss experts (gate_up_proj [hidden, 2*intermediate], down_proj
// [intermediate, hidden]).
func DequantMXFP4Transposed(dst []byte, dstT dtype.DType, blocks, scales []byte, rows, cols int) error {
	return dequantMXFP4(dst, dstT, blocks, scales, rows, cols, true)
}

func dequantMXFP4(dst []byte, dstT dtype.DType, blocks, scales []byte, rows, cols int, transpose bool) error {
	if rows < 0 || cols < 0 {
		return fmt.Errorf("quant: MXFP4 weight shape [%d, %d] is negative", rows, cols)
	}
	if cols%MXFP4BlockSize != 0 {
		return fmt.Errorf("quant: MXFP4 weight has %d columns, not a multiple of the block size %d", cols, MXFP4BlockSize)
	}
	n := rows * cols
	if len(blocks) != n/2 {
		return fmt.Errorf("quant: MXFP4 blocks are %d bytes, shape [%d, %d] needs %d", len(blocks), rows, cols, n/2)
	}
	groups := cols / MXFP4BlockSize
	if len(scales) != rows*groups {
		return fmt.Errorf("quant: MXFP4 scales are %d bytes, shape [%d, %d] needs %d ([%d, %d])", len(scales), rows, cols, rows*groups, rows, groups)
	}
	st, err := checkDst(dst, dstT, n)
	if err != nil {
		return err
	}
	for i, s := range scales {
		if s == 0xff {
			return fmt.Errorf("quant: MXFP4 scale %d (row %d, block %d) is 255, NaN in e8m0", i, i/max(groups, 1), i%max(groups, 1))
		}
	}
	for r := 0; r < rows; r++ {
		for g := 0; g < groups; g++ {
			s := dtype.E8M0ToF32(scales[r*groups+g])
			base := r*cols + g*MXFP4BlockSize
			for k := 0; k < MXFP4BlockSize/2; k++ {
				b := blocks[base/2+k]
				c := g*MXFP4BlockSize + 2*k
				lo := dtype.E2M1ToF32(b&0xf) * s
				hi := dtype.E2M1ToF32(b>>4) * s
				if transpose {
					st(dst, c*rows+r, lo)
					st(dst, (c+1)*rows+r, hi)
				} else {
					st(dst, base+2*k, lo)
					st(dst, base+2*k+1, hi)
				}
			}
		}
	}
	return nil
}

// MinFP8Scale is the smallest weight_scale_inv QuantFP8Block writes: a block
// whose largest magnitude is below 448 × MinFP8Scale (all zeros, say) gets
// this scale instead of amax/448, so that no block divides by zero.
const MinFP8Scale = float32(1e-12)

// QuantFP8Block quantizes one weight of shape [rows, cols] (row-major, src
// holding little-endian srcT elements: F32, BF16 or F16) to block-scaled
// float8_e4m3fn, the exact inverse convention of DequantFP8Block. For each
// block of block.Rows × block.Cols elements (partial at the right and
// bottom edges) the scale is amax/448 in float32 (amax the block's largest
// magnitude; at least MinFP8Scale); every element becomes
// float32(x) / scale rounded to float8_e4m3fn, nearest even, saturating at
// ±448 (dtype.F32ToF8E4M3Sat): torch's
// (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).
//
// w receives rows*cols bytes; scaleInv the F32 grid
// [ceil(rows/block.Rows), ceil(cols/block.Cols)], row-major, little-endian.
// A non-finite element (NaN, ±Inf) or sizes that do not match give an
// error naming it; w and scaleInv are then unspecified.
func QuantFP8Block(w, scaleInv []byte, src []byte, srcT dtype.DType, rows, cols int, block Block) error {
	if rows < 0 || cols < 0 {
		return fmt.Errorf("quant: weight shape [%d, %d] is negative", rows, cols)
	}
	if block.Rows <= 0 || block.Cols <= 0 {
		return fmt.Errorf("quant: FP8 weight_block_size [%d, %d] must be positive", block.Rows, block.Cols)
	}
	if !srcT.IsFloat() {
		return fmt.Errorf("quant: cannot quantize a %s weight to FP8 (want F32, BF16 or F16)", srcT)
	}
	n := rows * cols
	if len(src) != n*srcT.Size() {
		return fmt.Errorf("quant: weight is %d bytes, shape [%d, %d] of %s needs %d", len(src), rows, cols, srcT, n*srcT.Size())
	}
	if len(w) != n {
		return fmt.Errorf("quant: FP8 output is %d bytes, shape [%d, %d] needs %d", len(w), rows, cols, n)
	}
	sr, sc := block.ScaleGrid(rows, cols)
	if len(scaleInv) != sr*sc*4 {
		return fmt.Errorf("quant: weight_scale_inv output is %d bytes, the F32 [%d, %d] grid needs %d", len(scaleInv), sr, sc, sr*sc*4)
	}
	// One block row at a time, decoded to float32 once for both passes;
	// loops run per block column, so that no element pays a division.
	buf := make([]float32, min(block.Rows, rows)*cols)
	for r0 := 0; r0 < rows; r0 += block.Rows {
		r1 := min(r0+block.Rows, rows)
		vals := buf[:(r1-r0)*cols]
		decodeFloats(vals, src[r0*cols*srcT.Size():r1*cols*srcT.Size()], srcT)
		for j := 0; j < sc; j++ {
			c0, c1 := j*block.Cols, min((j+1)*block.Cols, cols)
			var amax float32
			for r := 0; r < r1-r0; r++ {
				for c, v := range vals[r*cols+c0 : r*cols+c1] {
					a := math.Float32frombits(math.Float32bits(v) &^ (1 << 31))
					if !(a <= math.MaxFloat32) {
						return fmt.Errorf("quant: element [%d, %d] is %v; only finite weights can be quantized", r0+r, c0+c, v)
					}
					amax = max(amax, a)
				}
			}
			s := max(amax/dtype.F8E4M3Max, MinFP8Scale)
			binary.LittleEndian.PutUint32(scaleInv[4*((r0/block.Rows)*sc+j):], math.Float32bits(s))
			for r := 0; r < r1-r0; r++ {
				out := w[(r0+r)*cols+c0 : (r0+r)*cols+c1]
				for c, v := range vals[r*cols+c0 : r*cols+c1] {
					out[c] = dtype.F32ToF8E4M3Sat(v / s)
				}
			}
		}
	}
	return nil
}

// decodeFloats reads len(dst) little-endian srcT elements (F32, BF16 or
// F16) of src into dst as float32.
func decodeFloats(dst []float32, src []byte, srcT dtype.DType) {
	le := binary.LittleEndian
	switch srcT {
	case dtype.BF16:
		for i := range dst {
			dst[i] = math.Float32frombits(dtype.BF16ToF32Bits(le.Uint16(src[2*i:])))
		}
	case dtype.F16:
		for i := range dst {
			dst[i] = math.Float32frombits(dtype.F16ToF32Bits(le.Uint16(src[2*i:])))
		}
	default:
		for i := range dst {
			dst[i] = math.Float32frombits(le.Uint32(src[4*i:]))
		}
	}
}
