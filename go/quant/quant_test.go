package quant

import (
	"encoding/binary"
	"encoding/json"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/dtype"
)

// goldenCase is one entry of testdata/cases.json, written by
// testdata/gen_golden.py from transformers' own dequantizers.
type goldenCase struct {
	Name     string `json:"name"`
	Kind     string `json:"kind"`
	Experts  int    `json:"experts"`
	Rows     int    `json:"rows"`
	Cols     int    `json:"cols"`
	Block    []int  `json:"block"`
	OutDType string `json:"out_dtype"`
	Weight   string `json:"weight"`
	ScaleInv string `json:"scale_inv"`
	SrcDType string `json:"src_dtype"`
	Src      string `json:"src"`
	Blocks   string `json:"blocks"`
	Scales   string `json:"scales"`
	Want     string `json:"want"`
}

func readGolden(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	require.NoError(t, err, "regenerate with: python3 go/quant/testdata/gen_golden.py")
	return b
}

// requireSameBits compares two little-endian arrays of dt element by
// element: bits must be equal, except that a NaN only has to stay NaN.
func requireSameBits(t *testing.T, dt dtype.DType, got, want []byte) {
	t.Helper()
	require.Equal(t, len(want), len(got))
	sz := dt.Size()
	bad := 0
	for i := 0; i < len(want); i += sz {
		var g, w uint32
		var nanG, nanW bool
		switch dt {
		case dtype.F32:
			g, w = binary.LittleEndian.Uint32(got[i:]), binary.LittleEndian.Uint32(want[i:])
			nanG, nanW = g&0x7fffffff > 0x7f800000, w&0x7fffffff > 0x7f800000
		case dtype.BF16:
			g, w = uint32(binary.LittleEndian.Uint16(got[i:])), uint32(binary.LittleEndian.Uint16(want[i:]))
			nanG, nanW = g&0x7fff > 0x7f80, w&0x7fff > 0x7f80
		case dtype.F16:
			g, w = uint32(binary.LittleEndian.Uint16(got[i:])), uint32(binary.LittleEndian.Uint16(want[i:]))
			nanG, nanW = g&0x7fff > 0x7c00, w&0x7fff > 0x7c00
		}
		if nanG != nanW || (!nanW && g != w) {
			if bad < 10 {
				t.Errorf("element %d: got 0x%X, transformers 0x%X", i/sz, g, w)
			}
			bad++
		}
	}
	require.Zero(t, bad, "%d of %d elements differ", bad, len(want)/sz)
}

// checkQuantGolden checks QuantFP8Block against torch's quantization of
// the same weight (gen_golden.py's fp8_quant_case).
func checkQuantGolden(t *testing.T, c goldenCase) {
	require.Len(t, c.Block, 2)
	srcT, err := dtype.ParseSafetensors(c.SrcDType)
	require.NoError(t, err)
	block := Block{Rows: c.Block[0], Cols: c.Block[1]}
	sr, sc := block.ScaleGrid(c.Rows, c.Cols)
	w, s := make([]byte, c.Rows*c.Cols), make([]byte, 4*sr*sc)
	require.NoError(t, QuantFP8Block(w, s, readGolden(t, c.Src), srcT, c.Rows, c.Cols, block))
	requireSameBits(t, dtype.F32, s, readGolden(t, c.ScaleInv))
	requireSameBytes(t, w, readGolden(t, c.Weight))
}

// requireSameBytes compares FP8 codes byte by byte.
func requireSameBytes(t *testing.T, got, want []byte) {
	t.Helper()
	require.Equal(t, len(want), len(got))
	bad := 0
	for i := range want {
		if got[i] != want[i] {
			if bad < 10 {
				t.Errorf("element %d: got 0x%02X (%g), torch 0x%02X (%g)", i, got[i], dtype.F8E4M3ToF32(got[i]), want[i], dtype.F8E4M3ToF32(want[i]))
			}
			bad++
		}
	}
	require.Zero(t, bad, "%d of %d FP8 codes differ", bad, len(want))
}

func TestAgainstTransformers(t *testing.T) {
	var doc struct {
		Cases []goldenCase `json:"cases"`
	}
	require.NoError(t, json.Unmarshal(readGolden(t, "cases.json"), &doc))
	kinds := map[string]int{}
	for _, c := range doc.Cases {
		t.Run(c.Name, func(t *testing.T) {
			if c.Kind == "fp8quant" {
				checkQuantGolden(t, c)
				return
			}
			out, err := dtype.ParseSafetensors(c.OutDType)
			require.NoError(t, err)
			want := readGolden(t, c.Want)
			switch c.Kind {
			case "fp8":
				require.Len(t, c.Block, 2)
				got := make([]byte, c.Rows*c.Cols*out.Size())
				require.NoError(t, DequantFP8Block(got, out, readGolden(t, c.Weight), readGolden(t, c.ScaleInv), dtype.F32,
					c.Rows, c.Cols, Block{Rows: c.Block[0], Cols: c.Block[1]}))
				requireSameBits(t, out, got, want)
			case "mxfp4":
				blocks, scales := readGolden(t, c.Blocks), readGolden(t, c.Scales)
				per := c.Rows * c.Cols * out.Size()
				require.Len(t, want, c.Experts*per)
				bpe, spe := c.Rows*c.Cols/2, c.Rows*c.Cols/MXFP4BlockSize
				for e := 0; e < c.Experts; e++ {
					got := make([]byte, per)
					require.NoError(t, DequantMXFP4Transposed(got, out, blocks[e*bpe:(e+1)*bpe], scales[e*spe:(e+1)*spe], c.Rows, c.Cols))
					requireSameBits(t, out, got, want[e*per:(e+1)*per])
				}
			default:
				t.Fatalf("unknown kind %q", c.Kind)
			}
		})
		kinds[c.Kind]++
	}
	assert.Positive(t, kinds["fp8"], "golden file has no FP8 case")
	assert.Positive(t, kinds["mxfp4"], "golden file has no MXFP4 case")
	assert.Positive(t, kinds["fp8quant"], "golden file has no FP8 quantization case")
}

func f32s(vs ...float32) []byte {
	b := make([]byte, 4*len(vs))
	for i, v := range vs {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(v))
	}
	return b
}

func readF32s(b []byte) []float32 {
	out := make([]float32, len(b)/4)
	for i := range out {
		out[i] = math.Float32frombits(binary.LittleEndian.Uint32(b[4*i:]))
	}
	return out
}

// TestFP8PartialBlocksByHand: a [3, 5] weight with 2x2 blocks has a [2, 3]
// scale grid whose last row and column cover partial blocks.
func TestFP8PartialBlocksByHand(t *testing.T) {
	one := byte(0x38) // 1.0 in float8_e4m3fn
	w := make([]byte, 15)
	for i := range w {
		w[i] = one
	}
	w[14] = 0xC0 // -2.0
	scales := f32s(1, 2, 3, 4, 5, 6)
	got := make([]byte, 15*4)
	require.NoError(t, DequantFP8Block(got, dtype.F32, w, scales, dtype.F32, 3, 5, Block{2, 2}))
	assert.Equal(t, []float32{
		1, 1, 2, 2, 3,
		1, 1, 2, 2, 3,
		4, 4, 5, 5, -12,
	}, readF32s(got))
	sr, sc := Block{128, 128}.ScaleGrid(200, 300)
	assert.Equal(t, [2]int{2, 3}, [2]int{sr, sc})
}

func TestMXFP4ByHand(t *testing.T) {
	// One row of 32: byte k = low nibble code k%16 (value), high nibble code 1 (0.5).
	blocks := make([]byte, 16)
	for k := range blocks {
		blocks[k] = 0x10 | byte(k)
	}
	got := make([]byte, 32*4)
	require.NoError(t, DequantMXFP4(got, dtype.F32, blocks, []byte{128}, 1, 32)) // scale 2
	v := readF32s(got)
	for k := 0; k < 16; k++ {
		assert.Equal(t, 2*dtype.E2M1ToF32(byte(k)), v[2*k], "even element %d", 2*k)
		assert.Equal(t, float32(1), v[2*k+1], "odd element %d", 2*k+1)
	}
	// Two rows, transposed: element (r, c) lands at c*rows + r.
	blocks2 := make([]byte, 32)
	blocks2[16] = 0x0e // row 1, element 0 = -4 (code 14), element 1 = 0
	tr := make([]byte, 64*4)
	require.NoError(t, DequantMXFP4Transposed(tr, dtype.F32, blocks2, []byte{127, 126}, 2, 32))
	assert.Equal(t, float32(-2), readF32s(tr)[0*2+1])
}

func TestErrors(t *testing.T) {
	dst := make([]byte, 4*4)
	w := make([]byte, 4)
	s := f32s(1)
	for name, err := range map[string]error{
		"short weight":   DequantFP8Block(dst, dtype.F32, w[:3], s, dtype.F32, 2, 2, Block{128, 128}),
		"short scales":   DequantFP8Block(dst, dtype.F32, w, s[:3], dtype.F32, 2, 2, Block{128, 128}),
		"too many scale": DequantFP8Block(dst, dtype.F32, w, f32s(1, 2), dtype.F32, 2, 2, Block{128, 128}),
		"zero block":     DequantFP8Block(dst, dtype.F32, w, s, dtype.F32, 2, 2, Block{0, 128}),
		"scale dtype":    DequantFP8Block(dst, dtype.F32, w, []byte{1}, dtype.U8, 2, 2, Block{128, 128}),
		"out dtype":      DequantFP8Block(dst, dtype.F8E4M3, w, s, dtype.F32, 2, 2, Block{128, 128}),
		"short dst":      DequantFP8Block(dst[:15], dtype.F32, w, s, dtype.F32, 2, 2, Block{128, 128}),
		"mx cols":        DequantMXFP4(make([]byte, 4*16), dtype.F32, make([]byte, 8), []byte{127}, 1, 16),
		"mx blocks":      DequantMXFP4(make([]byte, 4*32), dtype.F32, make([]byte, 15), []byte{127}, 1, 32),
		"mx scales":      DequantMXFP4(make([]byte, 4*32), dtype.F32, make([]byte, 16), []byte{127, 127}, 1, 32),
		"mx nan scale":   DequantMXFP4(make([]byte, 4*32), dtype.F32, make([]byte, 16), []byte{255}, 1, 32),
		"mx negative":    DequantMXFP4(nil, dtype.F32, nil, nil, -1, 32),
	} {
		assert.Error(t, err, name)
	}
	// Errors leave dst untouched.
	dst = make([]byte, 4*32)
	for i := range dst {
		dst[i] = 9
	}
	require.Error(t, DequantMXFP4(dst, dtype.F32, make([]byte, 16), []byte{255}, 1, 32))
	for i := range dst {
		require.Equal(t, byte(9), dst[i])
	}
	// BF16 scales are accepted.
	out := make([]byte, 4*4)
	require.NoError(t, DequantFP8Block(out, dtype.F32, []byte{0x38, 0x38, 0x38, 0x40}, []byte{0x00, 0x40}, dtype.BF16, 2, 2, Block{128, 128}))
	assert.Equal(t, []float32{2, 2, 2, 4}, readF32s(out))
}

// TestQuantFP8RoundTrip: quantizing then dequantizing (DequantFP8Block)
// returns every element within half an FP8 step of its block: |x - x'| <=
// 2^-4 |x| for normal results, and within 2^-10 × scale near zero.
func TestQuantFP8RoundTrip(t *testing.T) {
	rows, cols := 150, 260
	block := Block{128, 128}
	src := make([]float32, rows*cols)
	for i := range src {
		src[i] = float32(math.Sin(float64(i)*0.37)) * float32(1+i%97) * 0.01
	}
	sr, sc := block.ScaleGrid(rows, cols)
	w, s := make([]byte, rows*cols), make([]byte, 4*sr*sc)
	require.NoError(t, QuantFP8Block(w, s, f32s(src...), dtype.F32, rows, cols, block))
	back := make([]byte, 4*rows*cols)
	require.NoError(t, DequantFP8Block(back, dtype.F32, w, s, dtype.F32, rows, cols, block))
	got, scales := readF32s(back), readF32s(s)
	for i, x := range src {
		scale := scales[(i/cols/block.Rows)*sc+(i%cols)/block.Cols]
		tol := max(float32(math.Abs(float64(x)))/16, scale/1024)
		require.InDelta(t, x, got[i], float64(tol)*1.0001, "element %d (scale %g)", i, scale)
	}
	// The largest magnitude of block (0, 0) maps to ±448 exactly.
	best, bi := float32(0), 0
	for r := 0; r < block.Rows; r++ {
		for c := 0; c < block.Cols; c++ {
			if a := float32(math.Abs(float64(src[r*cols+c]))); a > best {
				best, bi = a, r*cols+c
			}
		}
	}
	assert.Equal(t, byte(0x7e), w[bi]&0x7f)
}

func TestQuantFP8Errors(t *testing.T) {
	w, s := make([]byte, 4), make([]byte, 4)
	src := f32s(1, 2, 3, 4)
	for name, err := range map[string]error{
		"short src":   QuantFP8Block(w, s, src[:15], dtype.F32, 2, 2, Block{128, 128}),
		"short w":     QuantFP8Block(w[:3], s, src, dtype.F32, 2, 2, Block{128, 128}),
		"long scales": QuantFP8Block(w, make([]byte, 8), src, dtype.F32, 2, 2, Block{128, 128}),
		"zero block":  QuantFP8Block(w, s, src, dtype.F32, 2, 2, Block{128, 0}),
		"int source":  QuantFP8Block(w, s, src, dtype.I32, 2, 2, Block{128, 128}),
		"fp8 source":  QuantFP8Block(w, s, make([]byte, 4), dtype.F8E4M3, 2, 2, Block{128, 128}),
		"negative":    QuantFP8Block(nil, nil, nil, dtype.F32, -1, 2, Block{128, 128}),
		"nan":         QuantFP8Block(w, s, f32s(1, float32(math.NaN()), 3, 4), dtype.F32, 2, 2, Block{128, 128}),
		"inf":         QuantFP8Block(w, s, f32s(1, 2, float32(math.Inf(-1)), 4), dtype.F32, 2, 2, Block{128, 128}),
	} {
		assert.Error(t, err, name)
	}
	err := QuantFP8Block(w, s, f32s(1, 2, float32(math.Inf(1)), 4), dtype.F32, 2, 2, Block{128, 128})
	assert.ErrorContains(t, err, "[1, 0]")
}

// quantFP8BlockReference is QuantFP8Block as first written (element by
// element, in row-major order): the optimised one must match it bit for bit.
func quantFP8BlockReference(w, scaleInv []byte, src []byte, srcT dtype.DType, rows, cols int, block Block) {
	load := loaderFor(srcT)
	sr, sc := block.ScaleGrid(rows, cols)
	_ = sr
	amax := make([]float32, sc)
	scale := make([]float32, sc)
	for r0 := 0; r0 < rows; r0 += block.Rows {
		r1 := min(r0+block.Rows, rows)
		clear(amax)
		for r := r0; r < r1; r++ {
			for c := 0; c < cols; c++ {
				a := float32(math.Abs(float64(load(src, r*cols+c))))
				if a > amax[c/block.Cols] {
					amax[c/block.Cols] = a
				}
			}
		}
		for j, a := range amax {
			s := max(a/dtype.F8E4M3Max, MinFP8Scale)
			scale[j] = s
			binary.LittleEndian.PutUint32(scaleInv[4*((r0/block.Rows)*sc+j):], math.Float32bits(s))
		}
		for r := r0; r < r1; r++ {
			for c := 0; c < cols; c++ {
				w[r*cols+c] = dtype.F32ToF8E4M3Sat(load(src, r*cols+c) / scale[c/block.Cols])
			}
		}
	}
}

// loaderFor returns a reader of element i of little-endian srcT bytes as
// float32 (srcT one of F32, BF16, F16).
func loaderFor(srcT dtype.DType) func(b []byte, i int) float32 {
	le := binary.LittleEndian
	switch srcT {
	case dtype.BF16:
		return func(b []byte, i int) float32 { return math.Float32frombits(dtype.BF16ToF32Bits(le.Uint16(b[2*i:]))) }
	case dtype.F16:
		return func(b []byte, i int) float32 { return math.Float32frombits(dtype.F16ToF32Bits(le.Uint16(b[2*i:]))) }
	}
	return func(b []byte, i int) float32 { return math.Float32frombits(le.Uint32(b[4*i:])) }
}

func TestQuantFP8BlockMatchesTheElementwiseReference(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, srcT := range []dtype.DType{dtype.F32, dtype.BF16, dtype.F16} {
		for _, tc := range []struct{ rows, cols, br, bc int }{{1, 1, 128, 128}, {130, 200, 128, 128}, {256, 64, 128, 128}, {37, 53, 16, 8}, {5, 300, 2, 128}} {
			src := make([]byte, tc.rows*tc.cols*srcT.Size())
			for i := 0; i < tc.rows*tc.cols; i++ {
				v := float32(rng.NormFloat64() * math.Pow(10, float64(rng.IntN(9)-6)))
				if rng.IntN(50) == 0 {
					v = 0
				}
				switch srcT {
				case dtype.BF16:
					binary.LittleEndian.PutUint16(src[2*i:], dtype.F32BitsToBF16(math.Float32bits(v)))
				case dtype.F16:
					binary.LittleEndian.PutUint16(src[2*i:], dtype.F32BitsToF16(math.Float32bits(v)))
				default:
					binary.LittleEndian.PutUint32(src[4*i:], math.Float32bits(v))
				}
			}
			b := Block{tc.br, tc.bc}
			sr, sc := b.ScaleGrid(tc.rows, tc.cols)
			w, s := make([]byte, tc.rows*tc.cols), make([]byte, 4*sr*sc)
			ww, ws := make([]byte, len(w)), make([]byte, len(s))
			require.NoError(t, QuantFP8Block(w, s, src, srcT, tc.rows, tc.cols, b))
			quantFP8BlockReference(ww, ws, src, srcT, tc.rows, tc.cols, b)
			require.Equal(t, ww, w, "%s %+v codes", srcT, tc)
			require.Equal(t, ws, s, "%s %+v scales", srcT, tc)
		}
	}
}
