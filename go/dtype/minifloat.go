package dtype

import "math"

// This file decodes the narrow float formats that quantized checkpoints ship:
// float8_e4m3fn and float8_e5m2 weights, e2m1 (FP4) values and e8m0 scales.
// Every decoded value is exactly representable in float32, so the decoders
// are exact.

// f8e4m3Table holds the float32 value of every float8_e4m3fn bit pattern.
var f8e4m3Table = func() (t [256]float32) {
	for i := range t {
		t[i] = decodeF8E4M3(uint8(i))
	}
	return t
}()

// decodeF8E4M3 computes the value of one float8_e4m3fn byte from its fields:
// sign bit, 4 exponent bits (bias 7), 3 mantissa bits. Exponent 0 holds the
// subnormals (mantissa × 2^-9); S.1111.111 is NaN; there are no infinities,
// so S.1111.000 to S.1111.110 are the normal values 256 to 448.
func decodeF8E4M3(b uint8) float32 {
	sign := float32(1)
	if b&0x80 != 0 {
		sign = -1
	}
	exp := int(b>>3) & 0xf
	man := float32(b & 0x7)
	switch {
	case b&0x7f == 0x7f:
		return float32(math.Copysign(math.NaN(), float64(sign)))
	case exp == 0:
		return sign * man * (1.0 / 512)
	default:
		return sign * float32(math.Ldexp(float64(8+man), exp-7-3))
	}
}

// F8E4M3ToF32 returns the value of the float8_e4m3fn ("F8_E4M3",
// torch.float8_e4m3fn) byte b as a float32, exactly: 0x7F and 0xFF are NaN
// (with b's sign), magnitudes run from 2^-9 (subnormal) to 448, and there
// are no infinities.
func F8E4M3ToF32(b uint8) float32 { return f8e4m3Table[b] }

// F8E5M2ToF32 returns the value of the float8_e5m2 ("F8_E5M2",
// torch.float8_e5m2) byte b as a float32, exactly. float8_e5m2 is the top
// byte of an IEEE binary16, so it has infinities (0x7C, 0xFC) and NaNs
// (exponent all ones, mantissa non-zero).
func F8E5M2ToF32(b uint8) float32 {
	return math.Float32frombits(F16ToF32Bits(uint16(b) << 8))
}

// e2m1Values holds the value of every e2m1 (FP4) code: sign bit 3, exponent
// bits 2..1 (bias 1), mantissa bit 0.
var e2m1Values = [16]float32{
	0, 0.5, 1, 1.5, 2, 3, 4, 6,
	float32(math.Copysign(0, -1)), -0.5, -1, -1.5, -2, -3, -4, -6,
}

// E2M1ToF32 returns the value of the e2m1 (FP4, OCP MX) code in the low four
// bits of n: ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}. Code 8 is -0. The high bits of n
// are ignored.
func E2M1ToF32(n uint8) float32 { return e2m1Values[n&0xf] }

// E8M0ToF32 returns the value of the e8m0 scale byte s (OCP MX
// "E8M0", torch.float8_e8m0fnu): 2^(s-127) for s in 0..254, which is exact
// in float32 (s = 0 gives the subnormal 2^-127), and NaN for s = 255.
func E8M0ToF32(s uint8) float32 {
	switch {
	case s == 0xff:
		return float32(math.NaN())
	case s == 0:
		return math.Float32frombits(0x00400000) // 2^-127
	default:
		return math.Float32frombits(uint32(s) << 23)
	}
}

// F8E4M3Max is the largest finite float8_e4m3fn magnitude (S.1111.110).
const F8E4M3Max = 448

// F32ToF8E4M3Sat rounds v to float8_e4m3fn, round to nearest, ties to even,
// saturating: magnitudes above 448 (Inf included) give ±448, as
// torch's v.clamp(-448, 448).to(torch.float8_e4m3fn) does. Results below
// 2^-6 round to the subnormals (multiples of 2^-9); -0 keeps its sign. NaN
// gives 0x7F with v's sign.
func F32ToF8E4M3Sat(v float32) uint8 {
	b := math.Float32bits(v)
	sign := uint8(b>>24) & 0x80
	a := b & 0x7fffffff
	switch {
	case a > 0x7f800000: // NaN
		return sign | 0x7f
	case a >= 0x43e00000: // >= 448, Inf included
		return sign | 0x7e
	case a < 0x3c800000: // < 2^-6: a multiple of 2^-9 (×512 is exact)
		return sign | uint8(math.RoundToEven(float64(math.Float32frombits(a))*512))
	}
	// Normal: keep 3 of the 23 mantissa bits, round to nearest even (a carry
	// into the exponent is the right result), rebias the exponent 127 → 7.
	r := (a + 0x7ffff + (a>>20)&1) >> 20
	code := r - (127-7)<<3
	if code > 0x7e { // 448 < |v| < 464 rounds down; from 464 it would be 480
		code = 0x7e
	}
	return sign | uint8(code)
}
