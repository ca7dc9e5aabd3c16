//go:build !cgo

package backend

// expertKernel: without cgo there are no SIMD kernels; ReferenceFFN
// computes every call, ExpertThreads or not.
func (c *CPU) expertKernel() ffnKernel { return nil }
