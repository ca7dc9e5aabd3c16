package engine

import (
	"testing"
)

// benchEngine is a configured engine over the float32 test model of L × E
// experts with `slots` cache slots, closed when the benchmark ends.
func benchEngine(b *testing.B, L, E, slots int) *Engine {
	b.Helper()
	e, err := New(Config{BudgetBytes: int64(slots) * slotBytes})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = e.Close() })
	model(&testing.T{}, e, L, E)
	if _, err := e.Configure(Setup{Layout: mixtralSpec}); err != nil {
		b.Fatal(err)
	}
	return e
}

// BenchmarkHotPathPerLayer measures the engine's host work for one MoE
// layer of a decode step (observe + acquire + release of 2 experts, all
// hits): the per-layer overhead the decode benchmark reports.
func BenchmarkHotPathPerLayer(b *testing.B) {
	const L, E = 32, 8
	e := benchEngine(b, L, E, L*E)
	// A few finished requests so the planner has something to match.
	for r := 0; r < 8; r++ {
		req, _ := e.BeginRequest()
		for l := 0; l < L; l++ {
			counts := make([]float32, E)
			counts[(l+r)%E] = 40
			counts[(l+r+3)%E] = 40
			_ = e.Observe(l, []uint64{req}, [][]float32{counts})
		}
		_ = e.EndRequest(req)
	}
	req, _ := e.BeginRequest()
	counts := make([]float32, E)
	slots := make([]int32, 2)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		l := i % L
		clear(counts)
		x0, x1 := int32(l%E), int32((l+3)%E)
		counts[x0], counts[x1] = 1, 1
		if err := e.Observe(l, []uint64{req}, [][]float32{counts}); err != nil {
			b.Fatal(err)
		}
		lease, err := e.Acquire(l, []int32{x0, x1}, slots, 0)
		if err != nil {
			b.Fatal(err)
		}
		if err := e.Release(lease, 0); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkObserveFineGrained measures Observe (tracing, priorities and
// the prefetch plan) of one MoE layer at the Qwen3-30B-A3B shape (48
// layers × 128 experts, 8 per token) with a full EAM collection: the
// tracer's per-layer host work in mapped mode.
func BenchmarkObserveFineGrained(b *testing.B) {
	const L, E, K = 48, 128, 8
	e := benchEngine(b, L, E, 64)
	counts := make([]float32, E)
	for r := 0; r < 300; r++ {
		req, _ := e.BeginRequest()
		for l := 0; l < L; l++ {
			clear(counts)
			for j := 0; j < K; j++ {
				counts[(l*7+r*3+j*11)%E] = 60
			}
			_ = e.Observe(l, []uint64{req}, [][]float32{counts})
		}
		_ = e.EndRequest(req)
	}
	e.planner.SetTopK(K) // as the first routing does
	req, _ := e.BeginRequest()
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		l := i % L
		clear(counts)
		for j := 0; j < K; j++ {
			counts[(l*5+i+j*13)%E] = 1
		}
		if err := e.Observe(l, []uint64{req}, [][]float32{counts}); err != nil {
			b.Fatal(err)
		}
	}
}
