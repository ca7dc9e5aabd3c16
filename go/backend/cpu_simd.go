//go:build cgo

package backend

import (
	"unsafe"

	"github.com/moe-infinity/moe_infinity/go/cpuffn"
	"github.com/moe-infinity/moe_infinity/go/dtype"
)

// expertKernel returns the SIMD expert kernel when ExpertThreads asks for
// one (created at the first call), else nil.
func (c *CPU) expertKernel() ffnKernel {
	if c.ExpertThreads == 0 {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.simd == nil {
		c.simd = simdKernel{cpuffn.New(c.ExpertThreads)}
	}
	return c.simd
}

// simdKernel is package cpuffn's kernel as the backend's ffnKernel.
type simdKernel struct{ k *cpuffn.Kernel }

// ffn runs a on the SIMD kernels when every row it reads is in the slots.
func (s simdKernel) ffn(c *CPU, a FFNArgs) (bool, error) {
	p, ok, err := c.simdProblem(a)
	if err != nil || !ok {
		return false, err
	}
	return true, s.k.Run(p)
}

// Close frees the kernel's workspace.
func (s simdKernel) Close() { s.k.Close() }

// simdProblem turns a into the SIMD kernels' problem. ok is false when some
// expert row the call reads lies outside the slots (the kernels read
// without a guard, so they read only memory that cannot fault).
func (c *CPU) simdProblem(a FFNArgs) (p cpuffn.Problem, ok bool, err error) {
	if err := a.Validate(); err != nil {
		return p, false, err
	}
	if a.FP8 != nil || a.GptOss != nil { // the SIMD kernels compute bfloat16/float16 SwiGLU experts only
		return p, false, nil
	}
	c.mu.Lock()
	var lo, hi uint64
	if c.arena != nil {
		lo = uint64(uintptr(unsafe.Pointer(&c.arena[0])))
		hi = lo + uint64(len(c.arena))
	}
	c.mu.Unlock()
	H, I := uint64(a.Hidden), uint64(a.Inter)
	inSlots := func(addr, n uint64) bool { return addr >= lo && addr+n <= hi && addr+n >= addr }
	P := a.T * a.K
	exps := unsafe.Slice((*int64)(HostPtr(a.TopK)), P)
	p = cpuffn.Problem{
		T: a.T, K: a.K, Hidden: a.Hidden, Inter: a.Inter, F16: a.DType == dtype.F16,
		X: a.X, Out: a.Out, Scratch: a.Scratch, Weights: routingWeights(a, P), Addend: a.Addend,
		Gate: make([]uint64, P), Up: make([]uint64, P), Down: make([]uint64, P),
	}
	for i, e := range exps {
		if err := a.checkPair(int64(i), e); err != nil {
			return p, false, err
		}
		if e < 0 || int(e) >= len(a.GateUp) || a.GateUp[e] == 0 || a.UpAddr(e) == 0 || a.Down[e] == 0 {
			continue // skipped: a null entry, or SkipInvalid
		}
		g, u, d := a.GateUp[e], a.UpAddr(e), a.Down[e]
		if !inSlots(g, I*H*2) || !inSlots(u, I*H*2) || !inSlots(d, H*I*2) {
			return p, false, nil
		}
		p.Gate[i], p.Up[i], p.Down[i] = g, u, d
	}
	return p, true, nil
}
