package trace

import (
	"math"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// newTracker returns a tracker over a fresh layers x experts collection.
func newTracker(t testing.TB, layers, experts, capacity int) *Tracker {
	t.Helper()
	c, err := NewCollection(layers, experts, capacity)
	require.NoError(t, err)
	return NewTracker(c)
}

func TestNewTracker_PanicsOnNilCollection(t *testing.T) {
	assert.Panics(t, func() { NewTracker(nil) })
}

func TestTracker_LifecycleRetiresIntoCollection(t *testing.T) {
	tr := newTracker(t, 3, 2, 4)
	a, b := tr.Begin(), tr.Begin()
	assert.NotZero(t, a)
	assert.NotZero(t, b)
	assert.NotEqual(t, a, b)
	assert.Equal(t, 2, tr.Active())

	// Prefill then two decode steps on layer 0, one on layer 2.
	require.NoError(t, tr.Observe(a, 0, []float32{5, 3}))
	require.NoError(t, tr.Observe(a, 0, []float32{1, 0}))
	require.NoError(t, tr.Observe(a, 0, []float32{0, 1}))
	require.NoError(t, tr.Observe(a, 2, []float32{2, 0}))

	p, ok := tr.Partial(a)
	require.True(t, ok)
	assert.Equal(t, []float32{6, 4, 0, 0, 2, 0}, p.Counts)
	p.Counts[0] = 99
	p2, _ := tr.Partial(a)
	assert.Equal(t, float32(6), p2.Counts[0], "Partial must return a copy")

	require.NoError(t, tr.End(a))
	assert.Equal(t, 1, tr.Active())
	snap := tr.Collection().Snapshot()
	require.Len(t, snap, 1)
	assert.Equal(t, []float32{6, 4, 0, 0, 2, 0}, snap[0].Counts)

	// An ended request is unknown from now on.
	require.ErrorIs(t, tr.End(a), ErrUnknownRequest)
	require.ErrorIs(t, tr.Observe(a, 0, []float32{1, 1}), ErrUnknownRequest)
	_, ok = tr.Partial(a)
	assert.False(t, ok)

	// A request that saw no tokens retires nothing.
	require.NoError(t, tr.End(b))
	assert.Equal(t, 1, tr.Collection().Len())
	assert.Zero(t, tr.Active())
}

func TestTracker_AbortDropsWithoutRetiring(t *testing.T) {
	tr := newTracker(t, 2, 2, 4)
	id := tr.Begin()
	require.NoError(t, tr.Observe(id, 1, []float32{1, 2}))
	require.NoError(t, tr.Abort(id))
	assert.Zero(t, tr.Active())
	assert.Zero(t, tr.Collection().Len())
	require.ErrorIs(t, tr.Abort(id), ErrUnknownRequest)
}

func TestTrackerObserve_RejectsBadInput(t *testing.T) {
	tests := []struct {
		name    string
		req     func(id uint64) uint64
		layer   int
		counts  []float32
		wantErr error
	}{
		{"unknown request", func(id uint64) uint64 { return id + 100 }, 0, []float32{1, 1}, ErrUnknownRequest},
		{"request zero", func(uint64) uint64 { return 0 }, 0, []float32{1, 1}, ErrUnknownRequest},
		{"negative layer", nil, -1, []float32{1, 1}, ErrOutOfRange},
		{"layer too large", nil, 2, []float32{1, 1}, ErrOutOfRange},
		{"too few counts", nil, 0, []float32{1}, ErrShapeMismatch},
		{"too many counts", nil, 0, []float32{1, 1, 1}, ErrShapeMismatch},
		{"NaN count", nil, 0, []float32{float32(math.NaN()), 1}, ErrInvalidCount},
		{"Inf count", nil, 0, []float32{1, float32(math.Inf(1))}, ErrInvalidCount},
		{"negative count", nil, 1, []float32{1, -1}, ErrInvalidCount},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tr := newTracker(t, 2, 2, 1)
			id := tr.Begin()
			req := id
			if tc.req != nil {
				req = tc.req(id)
			}
			require.ErrorIs(t, tr.Observe(req, tc.layer, tc.counts), tc.wantErr)
			p, ok := tr.Partial(id)
			require.True(t, ok)
			assert.Zero(t, p.Total(), "EAM unchanged on error")
		})
	}
}

func TestTrackerLayerTotals_SumsActiveRequests(t *testing.T) {
	tr := newTracker(t, 2, 3, 4)
	a, b, c := tr.Begin(), tr.Begin(), tr.Begin()
	require.NoError(t, tr.Observe(a, 1, []float32{1, 2, 0}))
	require.NoError(t, tr.Observe(b, 1, []float32{0, 3, 4}))
	require.NoError(t, tr.Observe(c, 1, []float32{10, 10, 10}))
	require.NoError(t, tr.Observe(a, 0, []float32{7, 0, 0}))
	require.NoError(t, tr.End(c)) // ended requests no longer count

	tests := []struct {
		name       string
		layer      int
		wantPer    []float32
		wantTokens float32
	}{
		{"layer 1", 1, []float32{1, 5, 4}, 10},
		{"layer 0", 0, []float32{7, 0, 0}, 7},
		{"negative layer", -1, nil, 0},
		{"layer past end", 2, nil, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			per, tokens := tr.LayerTotals(tc.layer)
			assert.Equal(t, tc.wantPer, per)
			assert.InDelta(t, tc.wantTokens, tokens, 0)
		})
	}
}

func TestTrackerPredict_UsesLivePartial(t *testing.T) {
	tr := newTracker(t, 3, 2, 4)
	done := tr.Begin()
	require.NoError(t, tr.Observe(done, 0, []float32{1, 0}))
	require.NoError(t, tr.Observe(done, 1, []float32{0, 4}))
	require.NoError(t, tr.Observe(done, 2, []float32{3, 1}))
	require.NoError(t, tr.End(done))

	id := tr.Begin()
	pred, err := tr.Predict(id, 0, 1)
	require.NoError(t, err)
	assert.Nil(t, pred, "all-zero partial has no positive match")

	require.NoError(t, tr.Observe(id, 0, []float32{2, 0}))
	pred, err = tr.Predict(id, 0, 1)
	require.NoError(t, err)
	require.NotNil(t, pred)
	assert.InDeltaSlice(t, []float32{0, 2.0 / 3}, pred.Row(1), 1e-7)
	assert.InDeltaSlice(t, []float32{0.75 / 3, 0.25 / 3}, pred.Row(2), 1e-7)

	_, err = tr.Predict(id+1, 0, 1)
	require.ErrorIs(t, err, ErrUnknownRequest)
}

func TestTracker_ConcurrentUseIsRaceFreeAndExact(t *testing.T) {
	const (
		layers, experts = 4, 8
		requests        = 8
		perRequest      = 8 // goroutines observing each request
		steps           = 200
	)
	tr := newTracker(t, layers, experts, 16)
	ids := make([]uint64, requests)
	var wg sync.WaitGroup
	var idMu sync.Mutex
	seen := map[uint64]bool{}
	for i := range requests {
		wg.Go(func() {
			id := tr.Begin()
			idMu.Lock()
			defer idMu.Unlock()
			assert.False(t, seen[id], "duplicate id %d", id)
			seen[id] = true
			ids[i] = id
		})
	}
	wg.Wait()

	counts := make([]float32, experts)
	for e := range counts {
		counts[e] = float32(e + 1)
	}
	for _, id := range ids {
		for g := range perRequest {
			wg.Go(func() {
				for s := range steps {
					assert.NoError(t, tr.Observe(id, (g+s)%layers, counts))
				}
			})
		}
	}
	// Readers racing with the writers.
	stop := make(chan struct{})
	var readers sync.WaitGroup
	for r := range 4 {
		readers.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				tr.LayerTotals(r % layers)
				if p, ok := tr.Partial(ids[r]); ok {
					tr.Collection().Match(p, 1, 3)
					tr.Collection().Predict(p, 1, 3)
				}
				_ = tr.Active()
			}
		})
	}
	// A writer retiring extra requests into the collection meanwhile.
	readers.Go(func() {
		for i := range 50 {
			id := tr.Begin()
			assert.NoError(t, tr.Observe(id, i%layers, counts))
			assert.NoError(t, tr.End(id))
		}
	})
	wg.Wait()
	close(stop)
	readers.Wait()

	// Every (g+s)%layers hits each layer steps*perRequest/layers times.
	wantCell := float32(steps * perRequest / layers)
	for _, id := range ids {
		p, ok := tr.Partial(id)
		require.True(t, ok)
		for l := range layers {
			for e, v := range p.Row(l) {
				require.Equal(t, wantCell*float32(e+1), v, "req %d layer %d expert %d", id, l, e)
			}
		}
	}
	per, tokens := tr.LayerTotals(0)
	assert.Equal(t, requests*int(wantCell)*36, int(tokens))
	assert.Equal(t, float32(requests)*wantCell*8, per[7])

	for _, id := range ids {
		wg.Go(func() { assert.NoError(t, tr.End(id)) })
	}
	wg.Wait()
	assert.Zero(t, tr.Active())
	assert.Equal(t, 16, tr.Collection().Len())
}
