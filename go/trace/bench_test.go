package trace

import (
	"fmt"
	"math/rand/v2"
	"testing"
)

// benchColl fills a collection of layers x experts to capacity with sparse
// random EAMs resembling top-2 routing (a few hot experts per layer).
func benchColl(b *testing.B, layers, experts, capacity int, rng *rand.Rand) *Collection {
	b.Helper()
	c, err := NewCollection(layers, experts, capacity)
	if err != nil {
		b.Fatal(err)
	}
	for range capacity {
		if err := c.Add(benchEAM(layers, experts, rng)); err != nil {
			b.Fatal(err)
		}
	}
	return c
}

// benchEAM returns a random EAM with 4 active experts per layer.
func benchEAM(layers, experts int, rng *rand.Rand) *EAM {
	m := NewEAM(layers, experts)
	for l := range layers {
		row := m.Row(l)
		for range 4 {
			row[rng.IntN(experts)] += float32(1 + rng.IntN(64))
		}
	}
	return m
}

// BenchmarkPredict measures Collection.Predict (k = 8, predicting from the
// middle layer) for the paper's typical shapes and EAMC capacities. The
// "sparse" query has 4 active experts per layer (a short request); the
// "dense" one has every expert active (a long prompt), the worst case.
func BenchmarkPredict(b *testing.B) {
	shapes := []struct{ layers, experts int }{{32, 8}, {48, 128}}
	for _, s := range shapes {
		for _, capacity := range []int{100, 1000, 10000} {
			rng := rand.New(rand.NewPCG(1, uint64(capacity)))
			c := benchColl(b, s.layers, s.experts, capacity, rng)
			sparse := benchEAM(s.layers, s.experts, rng)
			dense := benchEAM(s.layers, s.experts, rng)
			for i := range dense.Counts {
				dense.Counts[i] += float32(1 + rng.IntN(8))
			}
			for _, qc := range []struct {
				name string
				q    *EAM
			}{{"sparse", sparse}, {"dense", dense}} {
				b.Run(fmt.Sprintf("L%dxE%d/cap%d/%s", s.layers, s.experts, capacity, qc.name), func(b *testing.B) {
					layer := s.layers / 2
					b.ReportAllocs()
					for b.Loop() {
						if c.Predict(qc.q, layer, 8) == nil {
							b.Fatal("no prediction")
						}
					}
				})
			}
		}
	}
}

// BenchmarkCollectionAddFull measures Add into a full collection, which
// scans every stored EAM for the most similar one.
func BenchmarkCollectionAddFull(b *testing.B) {
	for _, capacity := range []int{100, 1000} {
		b.Run(fmt.Sprintf("L48xE128/cap%d", capacity), func(b *testing.B) {
			rng := rand.New(rand.NewPCG(2, uint64(capacity)))
			c := benchColl(b, 48, 128, capacity, rng)
			ms := make([]*EAM, 64)
			for i := range ms {
				ms[i] = benchEAM(48, 128, rng)
			}
			b.ReportAllocs()
			b.ResetTimer()
			i := 0
			for b.Loop() {
				if err := c.Add(ms[i%len(ms)]); err != nil {
					b.Fatal(err)
				}
				i++
			}
		})
	}
}

// BenchmarkTrackerObserve measures one Observe call (one layer's routing
// counts of one request) under parallel load on distinct requests.
func BenchmarkTrackerObserve(b *testing.B) {
	c, err := NewCollection(48, 128, 16)
	if err != nil {
		b.Fatal(err)
	}
	tr := NewTracker(c)
	counts := make([]float32, 128)
	counts[3], counts[77] = 1, 1
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		id := tr.Begin()
		l := 0
		for pb.Next() {
			if err := tr.Observe(id, l, counts); err != nil {
				b.Error(err)
				return
			}
			l = (l + 1) % 48
		}
	})
}

// qwenColl fills a collection of the Qwen3-30B-A3B shape (48 layers x 128
// experts) to capacity with EAMs of finished requests: ~64 tokens, each
// routed to top-8 experts per layer.
func qwenColl(b *testing.B, capacity int, rng *rand.Rand) *Collection {
	b.Helper()
	c, err := NewCollection(48, 128, capacity)
	if err != nil {
		b.Fatal(err)
	}
	for range capacity {
		m := NewEAM(48, 128)
		for range 64 {
			for l := range 48 {
				addTopK(m.Row(l), rng, 8)
			}
		}
		if err := c.Add(m); err != nil {
			b.Fatal(err)
		}
	}
	return c
}

// addTopK adds one token routed to k distinct random experts to row.
func addTopK(row []float32, rng *rand.Rand, k int) {
	for _, x := range rng.Perm(len(row))[:k] {
		row[x]++
	}
}

// BenchmarkMatchStep measures one layer's step of a decoding request at
// the Qwen3-30B-A3B shape with 1000 stored EAMs: observe the layer's
// routing of one token (top-8) and match the partial EAM over layers
// [0, layer] (k = 4, the planner's default). "incremental" is
// Tracker.Observe + Tracker.Match; "fullscan" is Tracker.Observe +
// Partial + Collection.Match, the rescan it replaces. The request has
// already decoded 32 tokens, and layers advance 0..47 and wrap.
func BenchmarkMatchStep(b *testing.B) {
	rng := rand.New(rand.NewPCG(11, 13))
	c := qwenColl(b, 1000, rng)
	rows := make([][]float32, 48*16)
	for i := range rows {
		rows[i] = make([]float32, 128)
		addTopK(rows[i], rng, 8)
	}
	for _, mode := range []string{"incremental", "fullscan"} {
		b.Run("L48xE128/cap1000/"+mode, func(b *testing.B) {
			tr := NewTracker(c)
			id := tr.Begin()
			for i := range 32 * 48 {
				if err := tr.Observe(id, i%48, rows[i%len(rows)]); err != nil {
					b.Fatal(err)
				}
			}
			if _, err := tr.Match(id, 47, 4); err != nil { // warm: build the matcher
				b.Fatal(err)
			}
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				l := i % 48
				if err := tr.Observe(id, l, rows[i%len(rows)]); err != nil {
					b.Fatal(err)
				}
				var ms []Match
				if mode == "incremental" {
					ms, _ = tr.Match(id, l, 4)
				} else {
					p, _ := tr.Partial(id)
					ms = c.Match(p, l, 4)
				}
				if len(ms) != 4 {
					b.Fatal("no matches")
				}
				i++
			}
		})
	}
}
