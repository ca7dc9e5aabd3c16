package dtype

import (
	"encoding/binary"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The vectors in testdata/ are produced by testdata/gen_vectors.py with
// PyTorch; see that script for the file layout.

func readVec(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	require.NoError(t, err, "regenerate with: python3 go/dtype/testdata/gen_vectors.py")
	return b
}

// allU16 returns all 65536 16-bit patterns, little-endian.
func allU16() []byte {
	b := make([]byte, 2*65536)
	for i := 0; i < 65536; i++ {
		binary.LittleEndian.PutUint16(b[2*i:], uint16(i))
	}
	return b
}

func isNaNBits(d DType, v uint64) bool {
	switch d {
	case F32:
		return v&0x7f800000 == 0x7f800000 && v&0x007fffff != 0
	case F16:
		return v&0x7c00 == 0x7c00 && v&0x03ff != 0
	case BF16:
		return v&0x7f80 == 0x7f80 && v&0x007f != 0
	}
	panic("not a float dtype")
}

func elem(d DType, b []byte, i int) uint64 {
	if d.Size() == 4 {
		return uint64(binary.LittleEndian.Uint32(b[4*i:]))
	}
	return uint64(binary.LittleEndian.Uint16(b[2*i:]))
}

// requireSameBits compares got and want element by element: bit-exact,
// except that a NaN expectation only requires a NaN.
func requireSameBits(t *testing.T, d DType, in []byte, inT DType, got, want []byte) {
	t.Helper()
	require.Equal(t, len(want), len(got))
	n := len(want) / d.Size()
	bad := 0
	for i := 0; i < n; i++ {
		g, w := elem(d, got, i), elem(d, want, i)
		if isNaNBits(d, w) {
			if !isNaNBits(d, g) {
				t.Errorf("element %d: input %s bits %#x: got %#x, want NaN", i, inT, elem(inT, in, i), g)
				bad++
			}
			continue
		}
		if g != w {
			t.Errorf("element %d: input %s bits %#x: got %#x, want %#x", i, inT, elem(inT, in, i), g, w)
			bad++
		}
		if bad > 20 {
			t.Fatal("too many mismatches")
		}
	}
}

func TestConvertAgainstTorch(t *testing.T) {
	f32in := readVec(t, "f32_inputs.bin")
	tests := []struct {
		name     string
		src      []byte
		srcT     DType
		dstT     DType
		wantFile string
	}{
		{"bf16->f32 all patterns", allU16(), BF16, F32, "bf16_to_f32.bin"},
		{"f16->f32 all patterns", allU16(), F16, F32, "f16_to_f32.bin"},
		{"bf16->f16 all patterns", allU16(), BF16, F16, "bf16_to_f16.bin"},
		{"f16->bf16 all patterns", allU16(), F16, BF16, "f16_to_bf16.bin"},
		{"f32->bf16 edge cases", f32in, F32, BF16, "f32_to_bf16.bin"},
		{"f32->f16 edge cases", f32in, F32, F16, "f32_to_f16.bin"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			want := readVec(t, tc.wantFile)
			require.Equal(t, len(tc.src)/tc.srcT.Size(), len(want)/tc.dstT.Size(), "vector files out of sync")
			// Aligned and deliberately misaligned buffers, fast and portable paths.
			for _, off := range []int{0, 1, 3} {
				srcBuf := make([]byte, len(tc.src)+off)[off:]
				copy(srcBuf, tc.src)
				dstBuf := make([]byte, len(want)+off)[off:]
				require.NoError(t, Convert(dstBuf, tc.dstT, srcBuf, tc.srcT))
				requireSameBits(t, tc.dstT, tc.src, tc.srcT, dstBuf, want)
			}
			got := make([]byte, len(want))
			convertPortable(got, tc.dstT, tc.src, tc.srcT, len(tc.src)/tc.srcT.Size())
			requireSameBits(t, tc.dstT, tc.src, tc.srcT, got, want)
		})
	}
}

// TestRoundTripExact checks that every non-NaN F16/BF16 value survives a
// round trip through F32 unchanged, and NaNs stay NaN with their sign.
func TestRoundTripExact(t *testing.T) {
	for _, d := range []DType{BF16, F16} {
		t.Run(d.String(), func(t *testing.T) {
			src := allU16()
			mid := make([]byte, 4*65536)
			back := make([]byte, 2*65536)
			require.NoError(t, Convert(mid, F32, src, d))
			require.NoError(t, Convert(back, d, mid, F32))
			for i := 0; i < 65536; i++ {
				g := binary.LittleEndian.Uint16(back[2*i:])
				if isNaNBits(d, uint64(i)) {
					require.True(t, isNaNBits(d, uint64(g)), "pattern %#x", i)
					require.Equal(t, uint16(i)&0x8000, g&0x8000, "NaN sign of %#x", i)
					continue
				}
				require.Equal(t, uint16(i), g, "pattern %#x", i)
			}
		})
	}
}

// TestF32ToHalfAgainstFloatMath cross-checks the bit tricks against a
// reference computed with float64 arithmetic on random inputs.
func TestF32ToHalfAgainstFloatMath(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 200000; i++ {
		u := r.Uint32()
		f := math.Float32frombits(u)
		if f != f {
			continue
		}
		assert.Equal(t, refF16(float64(f)), F32BitsToF16(u), "input %#x", u)
	}
}

// refF16 rounds x to binary16 with round-to-nearest-even using float64 math.
func refF16(x float64) uint16 {
	var sign uint16
	if math.Signbit(x) {
		sign = 0x8000
		x = -x
	}
	if x >= 65520 {
		return sign | 0x7c00
	}
	// Candidate grid spacing: subnormal 2^-24, else 2^(e-10).
	exp := math.Floor(math.Log2(x))
	if x == 0 || exp < -14 {
		exp = -14
	}
	// Guard against Log2 inexactness.
	for math.Ldexp(1, int(exp)) > x && exp > -14 {
		exp--
	}
	for math.Ldexp(1, int(exp)+1) <= x {
		exp++
	}
	ulp := math.Ldexp(1, int(exp)-10)
	q := math.RoundToEven(x / ulp) // exact: x/ulp fits in float64
	v := q * ulp
	// Encode v.
	if v == 0 {
		return sign
	}
	if v < math.Ldexp(1, -14) {
		return sign | uint16(v/math.Ldexp(1, -24))
	}
	e := math.Floor(math.Log2(v))
	for math.Ldexp(1, int(e)) > v {
		e--
	}
	for math.Ldexp(1, int(e)+1) <= v {
		e++
	}
	m := v/math.Ldexp(1, int(e)) - 1
	return sign | uint16(int(e)+15)<<10 | uint16(m*1024)
}

func TestConvertSameTypeAndEmpty(t *testing.T) {
	for _, d := range []DType{F32, F16, BF16} {
		src := []byte{1, 2, 3, 4, 5, 6, 7, 8}
		dst := make([]byte, 8)
		require.NoError(t, Convert(dst, d, src, d))
		assert.Equal(t, src, dst)
		require.NoError(t, Convert(nil, d, nil, F32))
		require.NoError(t, Convert([]byte{}, F32, []byte{}, d))
	}
}

func TestConvertErrors(t *testing.T) {
	tests := []struct {
		name      string
		dst       []byte
		dstT      DType
		src       []byte
		srcT      DType
		wantError string
	}{
		{"non-float source", make([]byte, 4), F32, make([]byte, 8), I64, "cannot convert I64 to F32"},
		{"non-float destination", make([]byte, 8), F64, make([]byte, 4), F32, "cannot convert F32 to F64"},
		{"invalid", make([]byte, 4), F32, make([]byte, 4), Invalid, "cannot convert Invalid"},
		{"odd source", make([]byte, 4), F32, make([]byte, 3), BF16, "source length 3 bytes is not a multiple of the BF16 element size 2"},
		{"odd destination", make([]byte, 5), F32, make([]byte, 4), BF16, "destination length 5 bytes is not a multiple of the F32 element size 4"},
		{"count mismatch", make([]byte, 8), F32, make([]byte, 6), F16, "source has 3 elements (6 bytes), destination 2 (8 bytes)"},
		{"count mismatch same type", make([]byte, 8), F16, make([]byte, 6), F16, "element count mismatch"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := append([]byte(nil), tc.dst...)
			err := Convert(tc.dst, tc.dstT, tc.src, tc.srcT)
			require.ErrorContains(t, err, tc.wantError)
			assert.Equal(t, before, tc.dst, "dst must be untouched on error")
		})
	}
}

func TestScalarHelpers(t *testing.T) {
	tests := []struct {
		name string
		f32  float32
		bf16 uint16
		f16  uint16
	}{
		{"one", 1, 0x3f80, 0x3c00},
		{"minus two", -2, 0xc000, 0xc000},
		{"f16 max", 65504, 0x4780, 0x7bff},
		{"f16 overflow tie", 65520, 0x4780, 0x7c00},
		{"just below overflow tie", math.Float32frombits(0x477fefff), 0x4780, 0x7bff},
		{"min f16 subnormal", float32(math.Ldexp(1, -24)), 0x3380, 0x0001},
		{"half min subnormal is zero", float32(math.Ldexp(1, -25)), 0x3300, 0x0000},
		{"just above half min subnormal", math.Float32frombits(0x33000001), 0x3300, 0x0001},
		{"1.5 min subnormal ties to 2", float32(1.5 * math.Ldexp(1, -24)), 0x33c0, 0x0002},
		{"inf", float32(math.Inf(1)), 0x7f80, 0x7c00},
		{"-inf", float32(math.Inf(-1)), 0xff80, 0xfc00},
		{"f32 max", math.MaxFloat32, 0x7f80, 0x7c00},
		{"negative zero", float32(math.Copysign(0, -1)), 0x8000, 0x8000},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			u := math.Float32bits(tc.f32)
			assert.Equal(t, tc.bf16, F32BitsToBF16(u))
			assert.Equal(t, tc.f16, F32BitsToF16(u))
		})
	}
	nan := math.Float32bits(float32(math.NaN()))
	assert.True(t, isNaNBits(BF16, uint64(F32BitsToBF16(nan))))
	assert.True(t, isNaNBits(F16, uint64(F32BitsToF16(nan))))
	assert.True(t, isNaNBits(BF16, uint64(F32BitsToBF16(0xff800001))), "signalling NaN with low payload only")
	assert.True(t, isNaNBits(F16, uint64(F32BitsToF16(0x7f800001))), "signalling NaN with low payload only")
	assert.Equal(t, uint32(0x3f800000), BF16ToF32Bits(0x3f80))
	assert.Equal(t, uint32(0x33800000), F16ToF32Bits(0x0001))
	assert.Equal(t, uint32(0x387fc000), F16ToF32Bits(0x03ff))
}

const benchBytes = 64 << 20

func BenchmarkConvertBF16ToF32(b *testing.B) {
	src := make([]byte, benchBytes)
	r := rand.New(rand.NewPCG(3, 4))
	for i := range src {
		src[i] = byte(r.Uint32())
	}
	dst := make([]byte, 2*len(src))
	b.SetBytes(int64(len(src)))
	b.ResetTimer()
	for b.Loop() {
		if err := Convert(dst, F32, src, BF16); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkConvertF32ToBF16(b *testing.B) {
	src := make([]byte, benchBytes)
	r := rand.New(rand.NewPCG(5, 6))
	for i := 0; i < len(src); i += 4 {
		binary.LittleEndian.PutUint32(src[i:], math.Float32bits(float32(r.NormFloat64())))
	}
	dst := make([]byte, len(src)/2)
	b.SetBytes(int64(len(src)))
	b.ResetTimer()
	for b.Loop() {
		if err := Convert(dst, BF16, src, F32); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkConvertF32ToF16(b *testing.B) {
	src := make([]byte, benchBytes)
	r := rand.New(rand.NewPCG(7, 8))
	for i := 0; i < len(src); i += 4 {
		binary.LittleEndian.PutUint32(src[i:], math.Float32bits(float32(r.NormFloat64())))
	}
	dst := make([]byte, len(src)/2)
	b.SetBytes(int64(len(src)))
	b.ResetTimer()
	for b.Loop() {
		if err := Convert(dst, F16, src, F32); err != nil {
			b.Fatal(err)
		}
	}
}
