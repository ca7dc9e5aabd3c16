package dtype

import (
	"encoding/binary"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// sameF32 reports whether a and b are the same float32: equal bits, or both
// NaN of the same sign (payloads may differ from torch's).
func sameF32(a, b float32) bool {
	ba, bb := math.Float32bits(a), math.Float32bits(b)
	if a != a || b != b {
		return a != a && b != b && ba>>31 == bb>>31
	}
	return ba == bb
}

func TestF8E4M3HandValues(t *testing.T) {
	neg0 := float32(math.Copysign(0, -1))
	for _, tc := range []struct {
		b    uint8
		want float32
	}{
		{0x00, 0}, {0x80, neg0},
		{0x01, 1.0 / 512}, // smallest subnormal 2^-9
		{0x81, -1.0 / 512},
		{0x07, 7.0 / 512}, // largest subnormal
		{0x08, 1.0 / 64},  // smallest normal 2^-6
		{0x38, 1}, {0x39, 1.125}, {0xB8, -1},
		{0x40, 2}, {0x3C, 1.5},
		{0x77, 240}, {0x78, 256}, // exponent 15 is an ordinary binade (no Inf)
		{0x7E, 448}, {0xFE, -448}, // largest finite
	} {
		assert.Truef(t, sameF32(F8E4M3ToF32(tc.b), tc.want), "0x%02X: got %v want %v", tc.b, F8E4M3ToF32(tc.b), tc.want)
	}
	for _, b := range []uint8{0x7F, 0xFF} {
		v := F8E4M3ToF32(b)
		assert.True(t, math.IsNaN(float64(v)), "0x%02X must be NaN", b)
		assert.Equal(t, b>>7 == 1, math.Signbit(float64(v)), "0x%02X NaN sign", b)
	}
	for b := 0; b < 256; b++ {
		assert.False(t, math.IsInf(float64(F8E4M3ToF32(uint8(b))), 0), "float8_e4m3fn has no infinities (0x%02X)", b)
	}
}

func TestF8E5M2HandValues(t *testing.T) {
	for _, tc := range []struct {
		b    uint8
		want float32
	}{
		{0x00, 0}, {0x01, 1.0 / 65536}, {0x3C, 1}, {0xBC, -1}, {0x7B, 57344},
		{0x7C, float32(math.Inf(1))}, {0xFC, float32(math.Inf(-1))},
	} {
		assert.Truef(t, sameF32(F8E5M2ToF32(tc.b), tc.want), "0x%02X: got %v want %v", tc.b, F8E5M2ToF32(tc.b), tc.want)
	}
	assert.True(t, math.IsNaN(float64(F8E5M2ToF32(0x7D))))
}

func TestE2M1Values(t *testing.T) {
	want := []float32{0, 0.5, 1, 1.5, 2, 3, 4, 6}
	for n, w := range want {
		assert.Equal(t, w, E2M1ToF32(uint8(n)), "code %d", n)
		assert.Equal(t, -w, E2M1ToF32(uint8(n|8)), "code %d", n|8)
		assert.Equal(t, E2M1ToF32(uint8(n)), E2M1ToF32(uint8(n|0xf0)), "high bits are ignored")
	}
	assert.True(t, math.Signbit(float64(E2M1ToF32(8))), "code 8 is -0")
	assert.False(t, math.Signbit(float64(E2M1ToF32(0))), "code 0 is +0")
}

func TestE8M0HandValues(t *testing.T) {
	assert.Equal(t, float32(1), E8M0ToF32(127))
	assert.Equal(t, float32(0.5), E8M0ToF32(126))
	assert.Equal(t, float32(math.Ldexp(1, 127)), E8M0ToF32(254))
	assert.Equal(t, float32(math.Ldexp(1, -126)), E8M0ToF32(1))
	assert.Equal(t, float32(math.Ldexp(1, -127)), E8M0ToF32(0), "s=0 is the subnormal 2^-127")
	assert.True(t, math.IsNaN(float64(E8M0ToF32(255))))
	for s := 0; s < 255; s++ {
		assert.Equal(t, float32(math.Ldexp(1, s-127)), E8M0ToF32(uint8(s)), "s=%d", s)
	}
}

// TestNarrowFloatsAgainstTorch compares every byte pattern with torch's own
// conversion (testdata/gen_minifloat.py).
func TestNarrowFloatsAgainstTorch(t *testing.T) {
	for _, tc := range []struct {
		file string
		fn   func(uint8) float32
	}{
		{"f8e4m3_to_f32.bin", F8E4M3ToF32},
		{"f8e5m2_to_f32.bin", F8E5M2ToF32},
		{"e8m0_to_f32.bin", E8M0ToF32},
	} {
		t.Run(tc.file, func(t *testing.T) {
			b := readVec(t, tc.file)
			require.Len(t, b, 4*256, "regenerate with: python3 go/dtype/testdata/gen_minifloat.py")
			for i := 0; i < 256; i++ {
				want := math.Float32frombits(binary.LittleEndian.Uint32(b[4*i:]))
				got := tc.fn(uint8(i))
				if want != want { // torch's NaN sign is not specified; NaN must stay NaN
					assert.Truef(t, got != got, "0x%02X: got %v, torch NaN", i, got)
					continue
				}
				assert.Truef(t, sameF32(got, want), "0x%02X: got %v (0x%08X), torch %v (0x%08X)",
					i, got, math.Float32bits(got), want, math.Float32bits(want))
			}
		})
	}
}

// nearestF8E4M3 is the definition F32ToF8E4M3Sat implements, by search: the
// finite code nearest to v, the even code on a tie, 448 beyond.
func nearestF8E4M3(v float32) uint8 {
	sign := uint8(0)
	if math.Signbit(float64(v)) {
		sign = 0x80
	}
	a := math.Abs(float64(v))
	best := uint8(0)
	for c := uint8(1); c <= 0x7e; c++ {
		d, db := math.Abs(a-float64(F8E4M3ToF32(c))), math.Abs(a-float64(F8E4M3ToF32(best)))
		if d < db || (d == db && c&1 == 0) {
			best = c
		}
	}
	return sign | best
}

func TestF32ToF8E4M3Sat(t *testing.T) {
	// Every finite code round-trips; midpoints go to the even neighbour.
	for c := 0; c < 256; c++ {
		b := uint8(c)
		if b&0x7f == 0x7f {
			continue
		}
		require.Equal(t, b, F32ToF8E4M3Sat(F8E4M3ToF32(b)), "code 0x%02X", b)
		if b&0x7f < 0x7e {
			lo, hi := F8E4M3ToF32(b), F8E4M3ToF32(b+1)
			mid := (lo + hi) / 2 // exact: at most 5 significant bits
			want := b
			if b&1 == 1 {
				want = b + 1
			}
			require.Equal(t, want, F32ToF8E4M3Sat(mid), "midpoint after 0x%02X (%g)", b, mid)
			require.Equal(t, b, F32ToF8E4M3Sat(math.Nextafter32(mid, lo)), "below the midpoint after 0x%02X", b)
			require.Equal(t, b+1, F32ToF8E4M3Sat(math.Nextafter32(mid, 2*hi)), "above the midpoint after 0x%02X", b)
		}
	}
	for _, tc := range []struct {
		v    float32
		want uint8
	}{
		{448, 0x7e}, {463.99, 0x7e}, {464, 0x7e}, {1e30, 0x7e}, {float32(math.Inf(1)), 0x7e}, {float32(math.Inf(-1)), 0xfe},
		{-500, 0xfe}, {float32(math.Copysign(0, -1)), 0x80}, {0, 0}, {1.0 / 1024, 0}, {3.0 / 1024, 0x02}, {1e-30, 0},
		{float32(math.NaN()), 0x7f}, {0.015625, 0x08}, {0.0146484375, 0x08}, // 2^-6, and 7.5×2^-9 → 8×2^-9 (even)
	} {
		assert.Equal(t, tc.want, F32ToF8E4M3Sat(tc.v), "%g", tc.v)
	}
	// Random values over the whole range against the search.
	rng := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 20000; i++ {
		v := float32(math.Ldexp(rng.Float64()*2-1, rng.IntN(24)-14))
		require.Equal(t, nearestF8E4M3(v), F32ToF8E4M3Sat(v), "%g", v)
	}
}
