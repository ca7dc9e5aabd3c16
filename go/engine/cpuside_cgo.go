//go:build cgo

package engine

import (
	"errors"
	"fmt"
	"sync"
	"time"
	"unsafe"

	"github.com/moe-infinity/moe_infinity/go/cpuffn"
)

// newCPUKernel is the SIMD expert FFN of package cpuffn on threads
// threads: the CPU side of hybrid execution. It runs the best instruction
// set the CPU has until measure has timed each of them on the model's
// shape.
func newCPUKernel(threads int) cpuKernel {
	k := cpuffn.New(threads)
	return &simdCPU{one: k, many: k}
}

// simdCPU runs calls of one token (decode) on one kernel and the others
// on another: on one H100 host AVX2 computed a one-token Mixtral expert
// 10-25% faster than AVX-512 BF16, which won from four tokens on and on
// Qwen3's small experts, so measure picks each from timings of the
// model's shape. The two may be one kernel.
type simdCPU struct{ one, many *cpuffn.Kernel }

func (s *simdCPU) kernel(T int64) *cpuffn.Kernel {
	if T <= 1 {
		return s.one
	}
	return s.many
}

func (s *simdCPU) run(p cpuProblem) error {
	return s.kernel(p.T).Run(cpuffn.Problem{
		T: p.T, K: p.K, Hidden: p.Hidden, Inter: p.Inter, F16: p.F16,
		X: p.X, Out: p.Out, Scratch: p.Scratch, PartialOut: p.PartialOut, Weights: p.Weights, Gate: p.Gate, Up: p.Up, Down: p.Down,
	})
}

func (s *simdCPU) close() {
	s.one.Close()
	if s.many != s.one {
		s.many.Close()
	}
}

func (s *simdCPU) setThreads(n int) {
	s.one.SetThreads(n)
	s.many.SetThreads(n)
}

// fastest is the instruction set of the shortest time (seconds, by ISA);
// ties go to the later one in cpuffn.ISAs. Scalar when times is empty.
func fastest(times map[cpuffn.ISA]float64) cpuffn.ISA {
	best, bestS := cpuffn.Scalar, 0.0
	for _, isa := range cpuffn.ISAs {
		if s, ok := times[isa]; ok && (bestS == 0 || s <= bestS) {
			best, bestS = isa, s
		}
	}
	return best
}

// candidateISAs are the instruction sets measure times: every one this
// CPU runs, the portable scalar code only where it is the only one.
func candidateISAs() []cpuffn.ISA {
	var out []cpuffn.ISA
	for _, isa := range cpuffn.ISAs {
		if isa != cpuffn.Scalar && cpuffn.Supported(isa) {
			out = append(out, isa)
		}
	}
	if len(out) == 0 {
		out = []cpuffn.ISA{cpuffn.Scalar}
	}
	return out
}

// probeMaxBytes bounds the synthetic expert measure uses: it keeps the
// model's hidden size and shortens the intermediate one to fit.
const probeMaxBytes = 64 << 20

// measure times the CPU FFN on a synthetic expert of the model's shape
// (hidden × inter, at most probeMaxBytes) in anonymous memory, with each
// instruction set the CPU runs: one token and probeTokens tokens. The
// fastest for each becomes the kernel of its calls (ISAOne, ISAMany),
// and its times the figures (CPUGBps, CPUTokenCost). Then the CPU
// backend's copy (a Go copy of the same bytes, what its copy workers do:
// LinkGBps), and both at once (LinkShare, CPUShare). Each figure is the
// best of three.
func (s *simdCPU) measure(hidden, inter int64, f16 bool) (HybridCosts, error) {
	const probeTokens = 8
	inter = max(1, min(inter, probeMaxBytes/(6*hidden)))
	bytes := 6 * hidden * inter // gate, up, down of 2-byte elements
	w := make([]byte, bytes)
	for i := range w {
		w[i] = byte(i*7) & 0x3f // small finite bfloat16/float16 values
	}
	dst := make([]byte, bytes)
	x := make([]byte, 2*hidden*probeTokens)
	out := make([]byte, 2*hidden*probeTokens)
	scratch := make([]float32, inter*probeTokens)
	base := uint64(uintptr(unsafe.Pointer(&w[0])))
	prob := func(T int64) cpuProblem {
		p := cpuProblem{T: T, K: 1, Hidden: hidden, Inter: inter, F16: f16,
			X: uint64(uintptr(unsafe.Pointer(&x[0]))), Out: uint64(uintptr(unsafe.Pointer(&out[0]))),
			Scratch: uint64(uintptr(unsafe.Pointer(&scratch[0]))),
			Weights: make([]float32, T), Gate: make([]uint64, T), Up: make([]uint64, T), Down: make([]uint64, T)}
		for t := range T {
			p.Weights[t], p.Gate[t], p.Up[t], p.Down[t] = 1, base, base+uint64(2*hidden*inter), base+uint64(4*hidden*inter)
		}
		return p
	}
	best := func(f func() error) (float64, error) {
		b := 0.0
		for i := 0; i < 3; i++ {
			t0 := time.Now()
			if err := f(); err != nil {
				return 0, err
			}
			if d := time.Since(t0).Seconds(); i == 0 || d < b {
				b = d
			}
		}
		return max(b, 1e-9), nil
	}
	threads := s.one.Threads()
	ones, manys := map[cpuffn.ISA]float64{}, map[cpuffn.ISA]float64{}
	kernels := map[cpuffn.ISA]*cpuffn.Kernel{}
	closeExcept := func(a, b *cpuffn.Kernel) {
		for _, k := range kernels {
			if k != a && k != b {
				k.Close()
			}
		}
	}
	for _, isa := range candidateISAs() {
		k, err := cpuffn.NewISA(threads, isa)
		if err != nil {
			continue
		}
		kernels[isa] = k
		c := &simdCPU{one: k, many: k}
		var e1, e2 error
		ones[isa], e1 = best(func() error { return c.run(prob(1)) })
		manys[isa], e2 = best(func() error { return c.run(prob(probeTokens)) })
		if err := errors.Join(e1, e2); err != nil {
			closeExcept(nil, nil)
			return HybridCosts{}, fmt.Errorf("measuring the CPU expert FFN (%s): %w", isa, err)
		}
	}
	isaOne, isaMany := fastest(ones), fastest(manys)
	if kernels[isaOne] == nil || kernels[isaMany] == nil {
		closeExcept(nil, nil)
		return HybridCosts{}, fmt.Errorf("measuring the CPU expert FFN: no instruction set of %v runs here", candidateISAs())
	}
	s.close()
	s.one, s.many = kernels[isaOne], kernels[isaMany]
	closeExcept(s.one, s.many)
	one, many := ones[isaOne], manys[isaMany]
	cp, _ := best(func() error { copy(dst, w); return nil })
	// Both at once: the copy runs beside each FFN pass.
	var cpBoth, ffnBoth float64
	for i := 0; i < 3; i++ {
		var wg sync.WaitGroup
		var dc float64
		wg.Add(1)
		go func() {
			defer wg.Done()
			t0 := time.Now()
			copy(dst, w)
			dc = time.Since(t0).Seconds()
		}()
		t0 := time.Now()
		err := s.run(prob(1))
		df := time.Since(t0).Seconds()
		wg.Wait()
		if err != nil {
			return HybridCosts{}, fmt.Errorf("measuring the CPU expert FFN: %w", err)
		}
		if i == 0 || df < ffnBoth {
			ffnBoth = df
		}
		if i == 0 || dc < cpBoth {
			cpBoth = dc
		}
	}
	share := func(solo, both float64) float64 { return min(1, max(solo/max(both, 1e-9), 0.05)) }
	return HybridCosts{
		LinkGBps:     float64(bytes) / cp / 1e9,
		CPUGBps:      float64(bytes) / one / 1e9,
		CPUTokenCost: max(0, (many/one-1)/(probeTokens-1)),
		LinkShare:    share(cp, cpBoth),
		CPUShare:     share(one, ffnBoth),
		ISAOne:       isaOne.String(),
		ISAMany:      isaMany.String(),
	}, nil
}
