package backend

import (
	"runtime"
	"syscall"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/dtype"
	"github.com/moe-infinity/moe_infinity/go/store"
)

// faultyRows maps n bytes that fault on every read, like the pages of a
// checkpoint file past its end after it was truncated under the mapping.
func faultyRows(t *testing.T, n int) uint64 {
	t.Helper()
	b, err := syscall.Mmap(-1, 0, n, syscall.PROT_NONE, syscall.MAP_PRIVATE|syscall.MAP_ANON)
	require.NoError(t, err)
	t.Cleanup(func() { _ = syscall.Munmap(b) })
	return uint64(uintptr(unsafe.Pointer(&b[0])))
}

func TestCPUFFNFaultOnExpertRowsIsAnError(t *testing.T) {
	const H, I = 4, 1024 // P·I = 1024 pairs × rows: FFN splits them over goroutines
	tests := []struct {
		name            string
		procs           int
		faultyGU, fDown bool
		simdThreads     int
	}{
		{"gate/up rows fault, one goroutine", 1, true, false, 0},
		{"gate/up rows fault, several goroutines", 2, true, false, 0},
		{"down rows fault, several goroutines", 2, false, true, 0},
		// Rows outside the slots never reach the unguarded SIMD kernels.
		{"SIMD kernels on, gate/up rows outside the slots fault", 2, true, false, 2},
		{"SIMD kernels on, down rows outside the slots fault", 2, false, true, 2},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(tc.procs))
			src := &patternSource{size: 64}
			c := NewCPU(1)
			c.ExpertThreads = tc.simdThreads
			require.NoError(t, c.Open(1, 64, src))
			defer c.Close()
			good := make([]byte, 2*I*H*2)
			gu, down := uint64(uintptr(unsafe.Pointer(&good[0]))), uint64(uintptr(unsafe.Pointer(&good[0])))
			if tc.faultyGU {
				gu = faultyRows(t, 2*I*H*2)
			}
			if tc.fDown {
				down = faultyRows(t, H*I*2)
			}
			x, out := make([]uint16, H), make([]uint16, H)
			scratch := make([]float32, I)
			ids, w := []int64{0}, []float32{1}
			err := c.FFN(FFNArgs{
				X: uint64(uintptr(unsafe.Pointer(&x[0]))), Out: uint64(uintptr(unsafe.Pointer(&out[0]))),
				Scratch: uint64(uintptr(unsafe.Pointer(&scratch[0]))), TopK: uint64(uintptr(unsafe.Pointer(&ids[0]))),
				Weights: uint64(uintptr(unsafe.Pointer(&w[0]))), T: 1, K: 1, Hidden: H, Inter: I, DType: dtype.BF16, WDType: dtype.F32,
				GateUp: []uint64{gu}, Down: []uint64{down},
			})
			var fe *store.FaultError
			require.ErrorAs(t, err, &fe, "a fault reading expert rows is an error, not a crash")
			assert.Positive(t, src.guards, "the reads ran under the source's guard")
		})
	}
}
