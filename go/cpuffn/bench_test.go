//go:build cgo

package cpuffn_test

import (
	"fmt"
	"os"
	"runtime"
	"strconv"
	"sync"
	"testing"

	"github.com/moe-infinity/moe_infinity/go/cpuffn"
)

// The speed of the expert FFN against the machine's read bandwidth, in
// one run:
//
//	go test -run XXX -bench . -benchtime 10x ./go/cpuffn/
//
// CPUFFN_THREADS sets the thread count (default: every core). Each
// benchmark reports GB/s of expert weights read and its ratio to the
// probe's GB/s over a 1 GiB buffer on as many threads ("of_probe").

func benchThreads() int {
	if n, err := strconv.Atoi(os.Getenv("CPUFFN_THREADS")); err == nil && n > 0 {
		return n
	}
	return runtime.NumCPU()
}

var probe = sync.OnceValues(func() (float64, error) { return cpuffn.ReadBandwidth(1<<30, benchThreads(), 5) })

func BenchmarkReadBandwidth(b *testing.B) {
	for b.Loop() {
		gbps, err := cpuffn.ReadBandwidth(1<<30, benchThreads(), 3)
		if err != nil {
			b.Fatal(err)
		}
		b.ReportMetric(gbps, "GB/s")
	}
}

// benchExperts is E bfloat16 experts of hidden H and intermediate I in one
// buffer, filled with small values.
func benchExperts(E, H, I int64) (gateUp, down [][]uint16) {
	buf := make([]uint16, E*3*H*I)
	seed := uint32(1)
	for i := range buf {
		seed = seed*1664525 + 1013904223
		buf[i] = 0x3c00 | uint16(seed>>16)&0x807f // bf16 in ±[2^-7, 2^-6)
	}
	for e := range E {
		x := buf[e*3*H*I:]
		gateUp, down = append(gateUp, x[:2*H*I]), append(down, x[2*H*I:3*H*I])
	}
	return gateUp, down
}

func BenchmarkFFN(b *testing.B) {
	for _, m := range []struct {
		name       string
		H, I, E, K int64
	}{
		{"mixtral_4096x14336_top1", 4096, 14336, 1, 1},
		{"mixtral_4096x14336_top2", 4096, 14336, 2, 2},
		{"qwen3_2048x768_top8", 2048, 768, 48, 8},
		// One and two Qwen3 experts: what a hybrid decode layer hands the
		// CPU (about one of its misses).
		{"qwen3_2048x768_top1", 2048, 768, 48, 1},
		{"qwen3_2048x768_top2", 2048, 768, 48, 2},
		// A call with almost no work: the fixed cost of a call (its two
		// phases' fan-out and join).
		{"fixed_256x64_top1", 256, 64, 1, 1},
	} {
		gateUp, down := benchExperts(m.E, m.H, m.I)
		for _, T := range []int64{1, 4, 16} {
			for _, isa := range []cpuffn.ISA{cpuffn.Best(), cpuffn.AVX2} {
				b.Run(fmt.Sprintf("%s/T%d/%s/threads%d", m.name, T, isa, benchThreads()), func(b *testing.B) {
					if !cpuffn.Supported(isa) {
						b.Skipf("this CPU lacks %s", isa)
					}
					k, err := cpuffn.NewISA(benchThreads(), isa)
					if err != nil {
						b.Fatal(err)
					}
					defer k.Close()
					x := make([]uint16, T*m.H)
					for i := range x {
						x[i] = 0x3f80
					}
					out, scratch := make([]uint16, T*m.H), make([]float32, T*m.K*m.I)
					P := T * m.K
					p := cpuffn.Problem{T: T, K: m.K, Hidden: m.H, Inter: m.I, X: addr(x), Out: addr(out), Scratch: addr(scratch),
						Weights: make([]float32, P), Gate: make([]uint64, P), Up: make([]uint64, P), Down: make([]uint64, P)}
					var bytes, calls int64
					for b.Loop() {
						// Each call routes to the next experts (round robin over E),
						// every token to the same K: each weight is read once per call
						// and, past the last level cache, from memory.
						start := calls * m.K
						calls++
						used := map[int64]bool{}
						for t := range T {
							for j := range m.K {
								e := (start + j) % m.E
								i := t*m.K + j
								p.Weights[i] = 1 / float32(m.K)
								p.Gate[i], p.Up[i], p.Down[i] = addr(gateUp[e]), addr(gateUp[e])+uint64(m.I*m.H*2), addr(down[e])
								used[e] = true
							}
						}
						if err := k.Run(p); err != nil {
							b.Fatal(err)
						}
						bytes += int64(len(used)) * 3 * m.H * m.I * 2
					}
					gbps := float64(bytes) / b.Elapsed().Seconds() / 1e9
					b.ReportMetric(gbps, "GB/s")
					if pr, err := probe(); err == nil {
						b.ReportMetric(pr, "probe_GB/s")
						b.ReportMetric(gbps/pr, "of_probe")
					}
				})
			}
		}
	}
}
