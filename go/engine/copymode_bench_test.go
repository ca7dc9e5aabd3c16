package engine

import (
	"testing"

	"github.com/moe-infinity/moe_infinity/go/backend"
)

// BenchmarkCopyLayerLoads measures the copy driver's slot choice for one
// Mixtral-shape layer (cache.Pin of its 2 experts among 62 slots, mostly
// misses that evict): the part of a copy-mode layer's reaction time spent
// before the backend issues the first copy.
func BenchmarkCopyLayerLoads(b *testing.B) {
	const L, E = 32, 8
	e := benchEngine(b, L, E, 62)
	i := 0
	for b.Loop() {
		l := i % L
		ids := []int64{int64(i % E), int64((i*5 + 3) % E)}
		if ids[0] == ids[1] {
			ids[1] = (ids[1] + 1) % E
		}
		_, grants, err := e.layerLoads(backend.CapturedLayer{Layer: l, Pairs: 2, K: 2}, ids, nil)
		if err != nil {
			b.Fatal(err)
		}
		for _, g := range grants {
			if g.Load {
				e.cache.Complete(g.Slot, g.Gen, nil)
			}
		}
		e.cache.Unpin(grants)
		i++
	}
}
