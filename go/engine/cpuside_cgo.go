//go:build cgo

package engine

import (
	"fmt"
	"sync"
	"time"
	"unsafe"

	"github.com/moe-infinity/moe_infinity/go/cpuffn"
)

// newCPUKernel is the SIMD expert FFN of package cpuffn on threads
// threads: the CPU side of hybrid execution.
func newCPUKernel(threads int) cpuKernel { return simdCPU{cpuffn.New(threads)} }

type simdCPU struct{ k *cpuffn.Kernel }

func (s simdCPU) run(p cpuProblem) error {
	return s.k.Run(cpuffn.Problem{
		T: p.T, K: p.K, Hidden: p.Hidden, Inter: p.Inter, F16: p.F16,
		X: p.X, Out: p.Out, Scratch: p.Scratch, PartialOut: p.PartialOut, Weights: p.Weights, Gate: p.Gate, Up: p.Up, Down: p.Down,
	})
}

func (s simdCPU) close() { s.k.Close() }

func (s simdCPU) setThreads(n int) { s.k.SetThreads(n) }

// probeMaxBytes bounds the synthetic expert measure uses: it keeps the
// model's hidden size and shortens the intermediate one to fit.
const probeMaxBytes = 64 << 20

// measure times the CPU FFN on a synthetic expert of the model's shape
// (hidden × inter, at most probeMaxBytes) in anonymous memory: one token
// (CPUGBps), probeTokens tokens (CPUTokenCost); the CPU backend's copy
// (a Go copy of the same bytes, what its copy workers do: LinkGBps); and
// both at once (LinkShare, CPUShare). Each figure is the best of three.
func (s simdCPU) measure(hidden, inter int64, f16 bool) (HybridCosts, error) {
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
	one, err := best(func() error { return s.run(prob(1)) })
	if err != nil {
		return HybridCosts{}, fmt.Errorf("measuring the CPU expert FFN: %w", err)
	}
	many, err := best(func() error { return s.run(prob(probeTokens)) })
	if err != nil {
		return HybridCosts{}, fmt.Errorf("measuring the CPU expert FFN: %w", err)
	}
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
	}, nil
}
