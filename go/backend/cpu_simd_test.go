//go:build cgo

package backend

import (
	"encoding/binary"
	"math"
	"math/rand/v2"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/dtype"
)

func TestCPUCapabilitiesWithExpertThreads(t *testing.T) {
	for _, tc := range []struct {
		ref     bool
		threads int
		want    Capabilities
	}{
		{false, 0, Capabilities{}},
		{false, 2, Capabilities{ExpertKernels: true}},
		{true, 0, Capabilities{ExpertKernels: true, Mapped: true, MaxMappedPairs: CPUMappedPairs, QuantFormats: []string{"fp8", "mxfp4"}, FFNKinds: []string{"gpt_oss"}}},
		{true, 2, Capabilities{ExpertKernels: true, Mapped: true, MaxMappedPairs: CPUMappedPairs, QuantFormats: []string{"fp8", "mxfp4"}, FFNKinds: []string{"gpt_oss"}}},
	} {
		c := NewCPU(1)
		c.ReferenceKernels, c.ExpertThreads = tc.ref, tc.threads
		assert.Equal(t, tc.want, c.Capabilities(), "reference %v, threads %d", tc.ref, tc.threads)
	}
}

// With ExpertThreads the FFN over experts in slots runs the SIMD kernels
// (no guarded read: the source's Guard is not called) and matches the
// reference within the kernels' rounding (package cpuffn).
func TestCPUFFNRunsTheSIMDKernelsOnSlots(t *testing.T) {
	const H, I, E, T, K = 40, 24, 3, 5, 2
	expert := int64(3*I*H) * 2 // gate, up, down
	for _, f16 := range []bool{false, true} {
		src := &patternSource{size: expert}
		c := NewCPU(1)
		c.ExpertThreads = 2
		require.NoError(t, c.Open(E, expert, src))
		rng := rand.New(rand.NewPCG(3, 4))
		conv := func(v float32) uint16 {
			if f16 {
				return dtype.F32BitsToF16(math.Float32bits(v))
			}
			return dtype.F32BitsToBF16(math.Float32bits(v))
		}
		a := FFNArgs{T: T, K: K, Hidden: H, Inter: I, DType: dtype.BF16, WDType: dtype.F32}
		if f16 {
			a.DType = dtype.F16
		}
		for e := range E {
			b := c.SlotBytes(e)
			for i := 0; i < len(b); i += 2 {
				binary.LittleEndian.PutUint16(b[i:], conv((rng.Float32()*2-1)*0.3))
			}
			base := uint64(c.SlotAddr(e))
			a.GateUp = append(a.GateUp, base)
			a.Down = append(a.Down, base+uint64(2*I*H*2))
		}
		x := make([]uint16, T*H)
		for i := range x {
			x[i] = conv(rng.Float32()*2 - 1)
		}
		topk := []int64{0, 1, 2, 0, 1, 2, 0, 2, 1, 0}
		wts := []float32{0.5, 0.5, 0.7, 0.3, 0.1, 0.9, 0.6, 0.4, 0.2, 0.8}
		p := func(s any) uint64 {
			switch v := s.(type) {
			case []uint16:
				return uint64(uintptr(unsafe.Pointer(&v[0])))
			case []float32:
				return uint64(uintptr(unsafe.Pointer(&v[0])))
			case []int64:
				return uint64(uintptr(unsafe.Pointer(&v[0])))
			}
			panic("type")
		}
		a.X, a.TopK, a.Weights = p(x), p(topk), p(wts)
		want, got := make([]uint16, T*H), make([]uint16, T*H)
		a.Out, a.Scratch = p(want), p(make([]float32, T*K*I))
		require.NoError(t, c.ReferenceFFN(a))
		guards := src.guards
		a.Out, a.Scratch = p(got), p(make([]float32, T*K*I))
		require.NoError(t, c.FFN(a))
		assert.Equal(t, guards, src.guards, "the SIMD kernels ran (the reference reads under the guard)")
		ulp := 1.0 / 256
		val := func(b uint16) float64 { return float64(math.Float32frombits(uint32(b) << 16)) }
		if f16 {
			ulp = 1.0 / 2048
			val = func(b uint16) float64 { return float64(math.Float32frombits(dtype.F16ToF32Bits(b))) }
		}
		for i := range want {
			rowMax := 0.0
			for _, v := range want[i/H*H : (i/H+1)*H] {
				rowMax = math.Max(rowMax, math.Abs(val(v)))
			}
			assert.LessOrEqual(t, math.Abs(val(want[i])-val(got[i])), ulp*(2*math.Abs(val(want[i]))+rowMax), "f16 %v, element %d", f16, i)
		}

		// An expert outside the slots sends the whole call to the reference.
		outside := make([]uint16, 3*I*H)
		slot := c.SlotBytes(2)
		copy(outside, unsafe.Slice((*uint16)(unsafe.Pointer(&slot[0])), 3*I*H))
		a.GateUp[2], a.Down[2] = p(outside), p(outside)+uint64(2*I*H*2)
		a.Out = p(got)
		require.NoError(t, c.FFN(a))
		assert.Greater(t, src.guards, guards, "the reference ran, under the guard")
		assert.Equal(t, want, got, "and computed what it computes")

		// A null entry skips its pairs and an addend joins every token's
		// sum, in the SIMD kernels as in the reference (hybrid execution's
		// device part).
		addend := make([]float32, T*H)
		for i := range addend {
			addend[i] = rng.Float32()*2 - 1
		}
		a.GateUp[2], a.Down[2], a.Addend = 0, 0, p(addend)
		a.Out = p(want)
		require.NoError(t, c.ReferenceFFN(a))
		guards = src.guards
		a.Out = p(got)
		require.NoError(t, c.FFN(a))
		assert.Equal(t, guards, src.guards, "the SIMD kernels ran")
		for i := range want {
			rowMax := 0.0
			for _, v := range want[i/H*H : (i/H+1)*H] {
				rowMax = math.Max(rowMax, math.Abs(val(v)))
			}
			assert.LessOrEqual(t, math.Abs(val(want[i])-val(got[i])), ulp*(2*math.Abs(val(want[i]))+rowMax), "null entry and addend: f16 %v, element %d", f16, i)
		}
		require.NoError(t, c.Close())
	}
}
