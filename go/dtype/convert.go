package dtype

import (
	"encoding/binary"
	"fmt"
	"math/bits"
	"unsafe"
)

// hostLittleEndian reports whether the machine stores integers little-endian,
// in which case byte slices can be reinterpreted as []uint16/[]uint32 directly.
var hostLittleEndian = func() bool {
	x := uint16(1)
	return *(*byte)(unsafe.Pointer(&x)) == 1
}()

// Convert converts the elements in src, of dtype srcT, into dst, of dtype
// dstT, using little-endian byte layout for both. Both dtypes must satisfy
// IsFloat, len(src) must be a whole number of srcT elements, len(dst) a whole
// number of dstT elements, and the two element counts must be equal;
// otherwise Convert returns an error and leaves dst untouched.
//
// If srcT == dstT the bytes are copied (copy semantics; overlap is allowed).
// Otherwise src and dst must not overlap. Up-conversions (F16 or BF16 to F32)
// are exact. F32 to BF16 and F32 to F16 round to nearest, ties to even, and
// match PyTorch's Tensor.to() bit for bit for every non-NaN input: values
// beyond the target range become ±Inf, subnormal results are rounded
// correctly, ±0 and ±Inf are preserved. A NaN input always gives a quiet NaN
// of the same sign (the payload may differ from PyTorch's). BF16 <-> F16
// conversion goes through F32, as PyTorch does.
//
// Convert does not allocate. It runs on one goroutine; callers converting
// gigabytes can split the slices into element-aligned chunks and convert them
// concurrently.
func Convert(dst []byte, dstT DType, src []byte, srcT DType) error {
	if !srcT.IsFloat() || !dstT.IsFloat() {
		return fmt.Errorf("dtype: cannot convert %s to %s: only F32, F16 and BF16 are supported", srcT, dstT)
	}
	ss, ds := srcT.Size(), dstT.Size()
	if len(src)%ss != 0 {
		return fmt.Errorf("dtype: source length %d bytes is not a multiple of the %s element size %d", len(src), srcT, ss)
	}
	if len(dst)%ds != 0 {
		return fmt.Errorf("dtype: destination length %d bytes is not a multiple of the %s element size %d", len(dst), dstT, ds)
	}
	n := len(src) / ss
	if len(dst)/ds != n {
		return fmt.Errorf("dtype: element count mismatch converting %s to %s: source has %d elements (%d bytes), destination %d (%d bytes)",
			srcT, dstT, n, len(src), len(dst)/ds, len(dst))
	}
	if srcT == dstT {
		copy(dst, src)
		return nil
	}
	if n == 0 {
		return nil
	}
	if !hostLittleEndian {
		convertPortable(dst, dstT, src, srcT, n)
		return nil
	}
	switch {
	case srcT == BF16 && dstT == F32:
		bf16ToF32Slice(u32s(dst, n), u16s(src, n))
	case srcT == F16 && dstT == F32:
		f16ToF32Slice(u32s(dst, n), u16s(src, n))
	case srcT == F32 && dstT == BF16:
		f32ToBF16Slice(u16s(dst, n), u32s(src, n))
	case srcT == F32 && dstT == F16:
		f32ToF16Slice(u16s(dst, n), u32s(src, n))
	case srcT == BF16 && dstT == F16:
		d, s := u16s(dst, n), u16s(src, n)
		for i, v := range s {
			d[i] = F32BitsToF16(uint32(v) << 16)
		}
	case srcT == F16 && dstT == BF16:
		d, s := u16s(dst, n), u16s(src, n)
		for i, v := range s {
			d[i] = F32BitsToBF16(F16ToF32Bits(v))
		}
	}
	return nil
}

// u16s reinterprets the first 2n bytes of b as []uint16 (host order).
// Unaligned data is fine on the platforms Go supports for unaligned loads of
// pointer-free types; checkptr only rejects misaligned pointer-typed
// elements.
func u16s(b []byte, n int) []uint16 {
	return unsafe.Slice((*uint16)(unsafe.Pointer(unsafe.SliceData(b))), n)
}

// u32s reinterprets the first 4n bytes of b as []uint32 (host order).
func u32s(b []byte, n int) []uint32 {
	return unsafe.Slice((*uint32)(unsafe.Pointer(unsafe.SliceData(b))), n)
}

func bf16ToF32Slice(d []uint32, s []uint16) {
	d = d[:len(s)]
	for i, v := range s {
		d[i] = uint32(v) << 16
	}
}

func f16ToF32Slice(d []uint32, s []uint16) {
	d = d[:len(s)]
	for i, v := range s {
		d[i] = F16ToF32Bits(v)
	}
}

func f32ToBF16Slice(d []uint16, s []uint32) {
	d = d[:len(s)]
	for i, v := range s {
		d[i] = F32BitsToBF16(v)
	}
}

func f32ToF16Slice(d []uint16, s []uint32) {
	d = d[:len(s)]
	for i, v := range s {
		d[i] = F32BitsToF16(v)
	}
}

// convertPortable is the byte-order independent path used on big-endian
// hosts. Sizes have already been validated.
func convertPortable(dst []byte, dstT DType, src []byte, srcT DType, n int) {
	le := binary.LittleEndian
	for i := 0; i < n; i++ {
		var f uint32
		switch srcT {
		case F32:
			f = le.Uint32(src[4*i:])
		case BF16:
			f = uint32(le.Uint16(src[2*i:])) << 16
		case F16:
			f = F16ToF32Bits(le.Uint16(src[2*i:]))
		}
		switch dstT {
		case F32:
			le.PutUint32(dst[4*i:], f)
		case BF16:
			le.PutUint16(dst[2*i:], F32BitsToBF16(f))
		case F16:
			le.PutUint16(dst[2*i:], F32BitsToF16(f))
		}
	}
}

// BF16ToF32Bits returns the binary32 bit pattern of the bfloat16 value h
// (exact).
func BF16ToF32Bits(h uint16) uint32 { return uint32(h) << 16 }

// F32BitsToBF16 rounds the binary32 value with bit pattern f to bfloat16,
// round to nearest even. Overflow gives ±Inf; NaN gives a quiet NaN of the
// same sign.
func F32BitsToBF16(f uint32) uint16 {
	if f&0x7fffffff > 0x7f800000 { // NaN: keep sign and top payload, force quiet bit
		return uint16(f>>16) | 0x0040
	}
	return uint16((f + 0x7fff + (f>>16)&1) >> 16)
}

// F16ToF32Bits returns the binary32 bit pattern of the binary16 value h
// (exact, including subnormals; NaN payloads are kept).
func F16ToF32Bits(h uint16) uint32 {
	sign := uint32(h&0x8000) << 16
	exp := uint32(h>>10) & 0x1f
	man := uint32(h) & 0x3ff
	switch exp {
	case 0x1f: // Inf or NaN
		return sign | 0x7f800000 | man<<13
	case 0:
		if man == 0 {
			return sign
		}
		// Subnormal: value = man * 2^-24. Normalise so bit 10 is the implicit 1.
		shift := uint32(bits.LeadingZeros32(man)) - 21 // bit 10 -> 21 leading zeros
		man <<= shift
		return sign | (113-shift)<<23 | (man&0x3ff)<<13
	default:
		return sign | (exp+112)<<23 | man<<13
	}
}

// F32BitsToF16 rounds the binary32 value with bit pattern f to binary16,
// round to nearest even, as IEEE 754 (and PyTorch) specify: magnitudes from
// 65520 upwards become ±Inf, results below 2^-14 are rounded to subnormals,
// NaN gives a quiet NaN of the same sign.
func F32BitsToF16(f uint32) uint16 {
	sign := uint16(f>>16) & 0x8000
	a := f & 0x7fffffff
	switch {
	case a >= 0x477ff000: // >= 65520 (rounds up to 2^16), Inf or NaN
		if a > 0x7f800000 {
			return sign | 0x7e00 | uint16(a>>13)&0x3ff
		}
		return sign | 0x7c00
	case a >= 0x38800000: // >= 2^-14: normal result
		a -= 112 << 23 // rebias exponent from 127 to 15
		return sign | uint16((a+0xfff+(a>>13)&1)>>13)
	case a <= 0x33000000: // <= 2^-25: rounds to zero (2^-25 is a tie to even 0)
		return sign
	default: // subnormal result, value = m * 2^(e-150), unit 2^-24
		e := a >> 23
		m := a&0x7fffff | 0x800000
		shift := 126 - e // 14..24
		r := m >> shift
		rem := m & (1<<shift - 1)
		half := uint32(1) << (shift - 1)
		if rem > half || (rem == half && r&1 == 1) {
			r++
		}
		return sign | uint16(r)
	}
}
