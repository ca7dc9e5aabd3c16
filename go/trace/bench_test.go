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
