//go:build !cgo

package engine

// newCPUKernel: without cgo there is no SIMD expert FFN, and no CPU side.
func newCPUKernel(int) cpuKernel { return nil }
