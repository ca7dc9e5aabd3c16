package trace

import (
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// randRow returns a routing row of experts counts with topK experts hit by
// 1..maxTok tokens each (integer counts, like the engine observes).
func randRow(rng *rand.Rand, experts, topK, maxTok int) []float32 {
	row := make([]float32, experts)
	for range topK {
		row[rng.IntN(experts)] += float32(1 + rng.IntN(maxTok))
	}
	return row
}

// randStored returns a random non-zero EAM to store.
func randStored(rng *rand.Rand, layers, experts int) *EAM {
	m := NewEAM(layers, experts)
	for l := range layers {
		copy(m.Row(l), randRow(rng, experts, 1+rng.IntN(3), 8))
	}
	return m
}

// TestTrackerMatch_EqualsFullScan drives random requests through a tracker
// while the collection changes (appends, replacements, bursts longer than
// the change log, duplicates that tie) and checks that every incremental
// Match, PredictRaw and PredictRawAll equals the full scan exactly.
func TestTrackerMatch_EqualsFullScan(t *testing.T) {
	shapes := []struct {
		name                      string
		layers, experts, capacity int
	}{
		{"one layer", 1, 4, 3},
		{"small", 4, 8, 5},
		{"wide", 6, 32, 12},
		{"capacity one", 3, 6, 1},
	}
	for _, sh := range shapes {
		for seed := range uint64(40) {
			t.Run(fmt.Sprintf("%s/seed%d", sh.name, seed), func(t *testing.T) {
				rng := rand.New(rand.NewPCG(seed, 7))
				c, err := NewCollection(sh.layers, sh.experts, sh.capacity)
				require.NoError(t, err)
				tr := NewTracker(c)
				var stored []*EAM
				id := tr.Begin()
				layer := 0
				for step := range 300 {
					switch r := rng.IntN(100); {
					case r < 50: // observe the next layer, as a forward pass does
						require.NoError(t, tr.Observe(id, layer, randRow(rng, sh.experts, 1+rng.IntN(3), 4)))
						layer = (layer + 1) % sh.layers
					case r < 55: // observe any layer
						require.NoError(t, tr.Observe(id, rng.IntN(sh.layers), randRow(rng, sh.experts, 2, 4)))
					case r < 62: // store a new EAM, or a duplicate (ties)
						m := randStored(rng, sh.layers, sh.experts)
						if len(stored) > 0 && rng.IntN(3) == 0 {
							m = stored[rng.IntN(len(stored))]
						}
						stored = append(stored, m)
						require.NoError(t, c.Add(m))
					case r < 63: // a burst longer than the change log
						for range changeLogLen + 1 {
							require.NoError(t, c.Add(randStored(rng, sh.layers, sh.experts)))
						}
					case r < 65: // the request ends; a new one begins
						require.NoError(t, tr.End(id))
						id, layer = tr.Begin(), 0
					}
					upto := rng.IntN(sh.layers+2) - 1 // -1 .. L
					if rng.IntN(2) == 0 {
						upto = (layer + sh.layers - 1) % sh.layers // the layer just observed
					}
					k := rng.IntN(sh.capacity+2) - 0
					p, ok := tr.Partial(id)
					require.True(t, ok)
					want := c.Match(p, upto, k)
					got, err := tr.Match(id, upto, k)
					require.NoError(t, err)
					require.Equal(t, want, got, "step %d upto %d k %d", step, upto, k)

					if upto >= 0 && upto < sh.layers {
						wantRaw := c.PredictRaw(p, upto, max(k, 1))
						gotRaw, err := tr.PredictRaw(id, upto, max(k, 1))
						require.NoError(t, err)
						require.Equal(t, wantRaw, gotRaw, "PredictRaw step %d", step)
					}
					wantAll := c.PredictRawAll(p, max(k, 1))
					gotAll, err := tr.PredictRawAll(id, max(k, 1))
					require.NoError(t, err)
					require.Equal(t, wantAll, gotAll, "PredictRawAll step %d", step)
				}
			})
		}
	}
}

// TestTrackerMatch_ManyObservesBetweenMatches checks the path where more
// changes pile up between two matches than the matcher keeps pending.
func TestTrackerMatch_ManyObservesBetweenMatches(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 3))
	c, err := NewCollection(3, 4, 6)
	require.NoError(t, err)
	for range 6 {
		require.NoError(t, c.Add(randStored(rng, 3, 4)))
	}
	tr := NewTracker(c)
	id := tr.Begin()
	require.NoError(t, tr.Observe(id, 0, []float32{1, 0, 0, 0}))
	_, err = tr.Match(id, 0, 2) // builds the matcher
	require.NoError(t, err)
	for i := range 10 * maxPendingFactor * 12 {
		require.NoError(t, tr.Observe(id, i%3, randRow(rng, 4, 2, 3)))
	}
	p, _ := tr.Partial(id)
	for upto := range 3 {
		got, err := tr.Match(id, upto, 6)
		require.NoError(t, err)
		assert.Equal(t, c.Match(p, upto, 6), got, "upto %d", upto)
	}
}

// TestTrackerMatch_FractionalCounts checks fractional counts, whose
// incremental sums may round differently from the full scan: similarities
// agree to 1e-12.
func TestTrackerMatch_FractionalCounts(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 5))
	const L, E = 5, 16
	c, err := NewCollection(L, E, 20)
	require.NoError(t, err)
	for range 20 {
		m := NewEAM(L, E)
		for i := range m.Counts {
			if rng.IntN(3) == 0 {
				m.Counts[i] = rng.Float32() * 3
			}
		}
		require.NoError(t, c.Add(m))
	}
	tr := NewTracker(c)
	id := tr.Begin()
	for step := range 200 {
		row := make([]float32, E)
		for range 3 {
			row[rng.IntN(E)] = rng.Float32() * 0.7
		}
		require.NoError(t, tr.Observe(id, step%L, row))
		p, _ := tr.Partial(id)
		want := c.Match(p, step%L, 20)
		got, err := tr.Match(id, step%L, 20)
		require.NoError(t, err)
		require.Len(t, got, len(want))
		sims := make(map[int]float64, len(got))
		for _, m := range got {
			sims[m.Index] = m.Similarity
		}
		for _, m := range want {
			require.InDelta(t, m.Similarity, sims[m.Index], 1e-12, "step %d index %d", step, m.Index)
		}
	}
}

func TestTrackerMatch_Errors(t *testing.T) {
	c, err := NewCollection(2, 4, 4)
	require.NoError(t, err)
	require.NoError(t, c.Add(&EAM{Layers: 2, Experts: 4, Counts: []float32{1, 0, 0, 0, 0, 1, 0, 0}}))
	tr := NewTracker(c)
	id := tr.Begin()
	require.NoError(t, tr.End(id))
	tests := []struct {
		name string
		call func() error
	}{
		{"Match", func() error { _, err := tr.Match(id, 0, 1); return err }},
		{"PredictRaw", func() error { _, err := tr.PredictRaw(id, 0, 1); return err }},
		{"PredictRaw bad layer", func() error { _, err := tr.PredictRaw(id, 5, 1); return err }},
		{"PredictRawAll", func() error { _, err := tr.PredictRawAll(id, 1); return err }},
		{"never begun", func() error { _, err := tr.Match(99, 0, 1); return err }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			assert.ErrorIs(t, tc.call(), ErrUnknownRequest)
		})
	}
	live := tr.Begin()
	ms, err := tr.Match(live, 1, 3)
	require.NoError(t, err)
	assert.Equal(t, []Match{{Index: 0, Similarity: 0}}, ms, "an all-zero query matches with similarity 0, like Match")
	raw, err := tr.PredictRaw(live, 2, 1)
	require.NoError(t, err)
	assert.Nil(t, raw, "layer out of range: no prediction")
}

// TestTrackerMatch_Concurrent runs requests that observe and match while
// others end into the collection (replacing stored EAMs); under -race it
// checks the locking, and every match is checked against the full scan.
func TestTrackerMatch_Concurrent(t *testing.T) {
	const L, E = 4, 8
	c, err := NewCollection(L, E, 6)
	require.NoError(t, err)
	tr := NewTracker(c)
	errs := make(chan error, 4)
	for w := range 4 {
		go func() {
			rng := rand.New(rand.NewPCG(uint64(w), 1))
			for range 30 {
				id := tr.Begin()
				for l := range 2 * L {
					if err := tr.Observe(id, l%L, randRow(rng, E, 2, 3)); err != nil {
						errs <- err
						return
					}
					if _, err := tr.Match(id, l%L, 3); err != nil {
						errs <- err
						return
					}
				}
				if err := tr.End(id); err != nil {
					errs <- err
					return
				}
			}
			errs <- nil
		}()
	}
	for range 4 {
		require.NoError(t, <-errs)
	}
	id := tr.Begin()
	require.NoError(t, tr.Observe(id, 0, []float32{1, 2, 0, 0, 0, 0, 0, 1}))
	p, _ := tr.Partial(id)
	got, err := tr.Match(id, 0, 6)
	require.NoError(t, err)
	assert.Equal(t, c.Match(p, 0, 6), got)
	assert.Equal(t, 6, c.Len())
}
