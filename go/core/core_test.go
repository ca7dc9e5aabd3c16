package core

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/cache"
	"github.com/moe-infinity/moe_infinity/go/prefetch"
	"github.com/moe-infinity/moe_infinity/go/trace"
)

func newCore(t *testing.T, L, E, slots int, prefetchOn bool) *Core {
	t.Helper()
	coll, err := trace.NewCollection(L, E, 16)
	require.NoError(t, err)
	c, err := New(Config{Slots: slots, Collection: coll, Matches: 4, Prefetch: prefetchOn})
	require.NoError(t, err)
	t.Cleanup(c.Cache().Close)
	return c
}

// policyCore is a core of slots slots under policy for 2 layers of 4
// experts, prefetching off.
func policyCore(t *testing.T, slots int, policy cache.Policy) *Core {
	t.Helper()
	coll, err := trace.NewCollection(2, 4, 4)
	require.NoError(t, err)
	c, err := New(Config{Slots: slots, Policy: policy, Collection: coll})
	require.NoError(t, err)
	t.Cleanup(c.Cache().Close)
	return c
}

func key(l, x int) cache.Key { return cache.Key{Layer: int32(l), Expert: int32(x)} }

// The scorer is the paper's activation-aware priority plus the current
// plan's score (the formula go/sim's own scorer used to copy).
func TestScorerFollowsTheEnginesFormula(t *testing.T) {
	const L, E = 4, 3
	c := newCore(t, L, E, 2, true)
	// Before any observation: ε·LayerWeight(l), ordered by layer.
	eps, lw := trace.Epsilon, func(l int) float64 { return trace.LayerWeight(l, L) }
	assert.InDelta(t, eps, c.Priority(key(0, 2)), 1e-15)
	assert.InDelta(t, eps*lw(3), c.Priority(key(3, 0)), 1e-15)
	assert.Less(t, c.Priority(key(3, 0)), c.Priority(key(2, 0)))

	id := c.Begin()
	require.NoError(t, c.Observe(2, []uint64{id}, [][]float32{{3, 1, 0}}))
	w := lw(2)
	assert.InDelta(t, (3+eps)/4*w, c.Priority(key(2, 0)), 1e-12)
	assert.InDelta(t, (1+eps)/4*w, c.Priority(key(2, 1)), 1e-12)
	assert.InDelta(t, eps/4*w, c.Priority(key(2, 2)), 1e-12)
	require.NoError(t, c.Observe(1, nil, nil)) // nothing observed in layer 1: unchanged
	assert.InDelta(t, eps*lw(1), c.Priority(key(1, 0)), 1e-15)

	// Predictions add to the priority and are replaced by each plan.
	c.Queue().Update(id, []prefetch.Candidate{{Key: key(3, 1), Score: 0.5}, {Key: key(3, 1), Score: 0.7}, {Key: key(2, 2), Score: 0.2}})
	assert.Equal(t, 0.7, c.Predicted(key(3, 1)), "duplicates keep the higher score")
	assert.InDelta(t, eps*lw(3)+0.7, c.Priority(key(3, 1)), 1e-12)
	c.Queue().Update(id, []prefetch.Candidate{{Key: key(1, 0), Score: 0.1}})
	assert.Zero(t, c.Predicted(key(3, 1)))
	assert.Zero(t, c.Predicted(key(2, 2)))
	assert.Equal(t, 0.1, c.Predicted(key(1, 0)))
	require.NoError(t, c.End(id)) // the end of a request clears its plan
	assert.Zero(t, c.Predicted(key(1, 0)))
}

// Layer observes, then uses, then plans: the use sees the layer's fresh
// priorities and the previous plan, and the plan comes after it.
func TestLayerOrder(t *testing.T) {
	const L, E = 3, 4
	c := newCore(t, L, E, 4, true)
	// A stored request that used expert 2 in layer 0 and expert 3 in layer 1.
	old := c.Begin()
	require.NoError(t, c.Observe(0, []uint64{old}, [][]float32{{0, 0, 1, 0}}))
	require.NoError(t, c.Observe(1, []uint64{old}, [][]float32{{0, 0, 0, 1}}))
	require.NoError(t, c.End(old))
	c.Planner().Tune(-1, -1, -1)

	id := c.Begin()
	var seenPrio, seenPred float64
	plans, err := c.Layer(0, []uint64{id}, [][]float32{{0, 0, 1, 0}}, func() error {
		seenPrio = c.Priority(key(0, 2))
		seenPred = c.Predicted(key(1, 3))
		grants, err := c.Pin(0, []cache.Key{key(0, 2)}, nil)
		require.NoError(t, err)
		require.Len(t, grants, 1)
		assert.True(t, grants[0].Load, "an empty cache misses")
		c.Cache().Complete(grants[0].Slot, grants[0].Gen, nil)
		c.Cache().Unpin(grants)
		return nil
	})
	require.NoError(t, err)
	assert.Greater(t, seenPrio, trace.Epsilon, "observed before use")
	assert.Zero(t, seenPred, "planned after use")
	require.Len(t, plans, 1)
	require.NotEmpty(t, plans[0])
	assert.Equal(t, key(1, 3), plans[0][0].Key)
	assert.Positive(t, c.Predicted(key(1, 3)), "the plan is the cache's prediction")
	st := c.Cache().Stats()[0]
	assert.Equal(t, uint64(1), st.Misses)

	// Prefetching off: no plans, and switching off drops the queued ones.
	c.SetPrefetch(false)
	assert.Zero(t, c.Predicted(key(1, 3)))
	plans, err = c.Layer(1, []uint64{id}, [][]float32{{0, 0, 0, 1}}, nil)
	require.NoError(t, err)
	assert.Nil(t, plans)
	require.NoError(t, c.End(id))
}

// A routing the tracker refuses stops the layer before its use, as an
// ObserveError; the use's own error comes back after planning.
func TestLayerErrors(t *testing.T) {
	c := newCore(t, 2, 3, 2, true)
	used := false
	_, err := c.Layer(0, []uint64{99}, [][]float32{{1, 0, 0}}, func() error { used = true; return nil })
	var oe *ObserveError
	require.ErrorAs(t, err, &oe)
	assert.ErrorIs(t, err, trace.ErrUnknownRequest)
	assert.False(t, used)

	id := c.Begin()
	boom := errors.New("boom")
	plans, err := c.Layer(0, []uint64{id}, [][]float32{{1, 0, 0}}, func() error { return boom })
	assert.ErrorIs(t, err, boom)
	assert.Len(t, plans, 1, "planned despite the use's error")
	require.NoError(t, c.End(id))
	assert.ErrorIs(t, c.End(id), trace.ErrUnknownRequest)
}

// A hint is planned ahead and spent by the layer's next Pin; nothing is
// planned with prefetching off.
func TestHintSpentByPin(t *testing.T) {
	c := newCore(t, 2, 3, 2, true)
	c.Hint(1, []int32{2})
	assert.Equal(t, prefetch.HintScore, c.Predicted(key(1, 2)))
	g, err := c.Pin(1, []cache.Key{key(1, 0)}, nil)
	require.NoError(t, err)
	c.Cache().Complete(g[0].Slot, g[0].Gen, nil)
	c.Cache().Unpin(g)
	assert.Zero(t, c.Predicted(key(1, 2)))

	c.SetPrefetch(false)
	c.Hint(1, []int32{2})
	assert.Zero(t, c.Predicted(key(1, 2)))
	assert.False(t, c.Prefetching())
}

func TestNewNeedsACollection(t *testing.T) {
	_, err := New(Config{Slots: 1})
	assert.Error(t, err)
	coll, err := trace.NewCollection(1, 1, 1)
	require.NoError(t, err)
	_, err = New(Config{Slots: 0, Collection: coll})
	assert.Error(t, err)
}

// The dispatch order is the queue's, best first, and each planned expert
// is taken once while it stays planned: evicted and planned again by a
// newer plan that still holds it, it is not taken again; dropped and
// planned anew, it is. A candidate the cache refuses (here: resident) is
// dropped without the caller's PrefetchDone.
func TestPrefetchDispatchTakesEachPlannedExpertOnce(t *testing.T) {
	c := newCore(t, 3, 4, 2, true)
	const owner = 7
	plan := []prefetch.Candidate{{Key: key(2, 1), Score: 0.4}, {Key: key(1, 3), Score: 0.9}}
	load := func(cand prefetch.Candidate) {
		t.Helper()
		g, ok := c.ReservePrefetch(cand)
		require.True(t, ok, "reserved %v", cand.Key)
		c.Cache().Complete(g.Slot, g.Gen, nil)
		c.PrefetchDone()
	}
	pin := func(keys ...cache.Key) {
		t.Helper()
		grants, err := c.Pin(int(keys[0].Layer), keys, nil)
		require.NoError(t, err)
		for _, g := range grants {
			if g.Load {
				c.Cache().Complete(g.Slot, g.Gen, nil)
			}
		}
		c.Cache().Unpin(grants)
	}

	c.Queue().Update(owner, plan)
	var taken []cache.Key
	for {
		cand, ok := c.TryTakePrefetch()
		if !ok {
			break
		}
		taken = append(taken, cand.Key)
		load(cand)
	}
	assert.Equal(t, []cache.Key{key(1, 3), key(2, 1)}, taken, "best first")
	assert.True(t, c.Queue().Idle())

	pin(key(0, 0), key(0, 1)) // evicts both prefetches
	c.Queue().Update(owner, plan)
	_, ok := c.TryTakePrefetch()
	assert.False(t, ok, "still planned: not taken again")

	c.Queue().Update(owner, nil)
	c.Queue().Update(owner, plan)
	pin(key(1, 3))
	cand, ok := c.TryTakePrefetch()
	require.True(t, ok, "planned anew: taken again")
	assert.Equal(t, key(1, 3), cand.Key)
	_, ok = c.ReservePrefetch(cand)
	assert.False(t, ok, "resident: refused")
	cand, ok = c.TryTakePrefetch()
	require.True(t, ok)
	load(cand)
	assert.True(t, c.Queue().Idle(), "the refused candidate was dropped")
	assert.Equal(t, uint64(2), c.Cache().Stats()[2].PrefetchLoads)
}

// With room for fewer admissions than misses, UseInPlace offers the ones
// the policy values most first: under LFU the expert used three times
// before goes in ahead of one seen for the first time, though it comes
// second in the layer's keys; with room for all, keys' order is kept.
func TestUseInPlaceOffersTheMostValuedFirstWhenRoomIsShort(t *testing.T) {
	c := policyCore(t, 4, cache.PolicyLFU)
	for range 3 {
		assert.Empty(t, c.UseInPlace([]cache.Key{key(0, 2)}, []bool{false}, 0, 0), "no room: counted only")
	}
	grants := c.UseInPlace([]cache.Key{key(0, 1), key(0, 2)}, []bool{false, false}, 0, 1)
	require.Len(t, grants, 1)
	assert.Equal(t, key(0, 2), grants[0].Key)
	grants = append(grants, c.UseInPlace([]cache.Key{key(1, 3), key(1, 0)}, []bool{false, false}, 0, -1)...)
	require.Len(t, grants, 3)
	assert.Equal(t, []cache.Key{key(1, 3), key(1, 0)}, []cache.Key{grants[1].Key, grants[2].Key})
	for _, g := range grants {
		c.Cache().Complete(g.Slot, g.Gen, nil)
	}
}

// UseInPlace counts every use, offers each miss to the cache in order and
// decides every admission of the layer before any copy completes: a
// layer's admissions never evict one another (with LRU, which always
// admits, the third miss finds both other slots still loading).
func TestUseInPlaceDecidesTheLayersAdmissionsTogether(t *testing.T) {
	c := policyCore(t, 2, cache.PolicyLRU)
	g, err := c.Pin(1, []cache.Key{key(1, 0)}, nil)
	require.NoError(t, err)
	c.Cache().Complete(g[0].Slot, g[0].Gen, nil)
	c.Cache().Unpin(g)

	for _, tc := range []struct {
		name string
		keys []cache.Key
		hits []bool
		most int
		want []cache.Key
	}{
		{"hits are not offered", []cache.Key{key(1, 0)}, []bool{true}, -1, nil},
		{"no room: counted, none admitted", []cache.Key{key(0, 1)}, []bool{false}, 0, nil},
		{"misses in order, none evicting another", []cache.Key{key(0, 1), key(0, 2), key(0, 3)}, []bool{false, false, false}, -1, []cache.Key{key(0, 1), key(0, 2)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			grants := c.UseInPlace(tc.keys, tc.hits, 0, tc.most)
			var got []cache.Key
			for _, g := range grants {
				assert.True(t, g.Load)
				_, st := c.Cache().Lookup(g.Key)
				assert.Equal(t, cache.Loading, st, "reserved, for the caller to copy")
				got = append(got, g.Key)
			}
			assert.Equal(t, tc.want, got)
			for _, g := range grants {
				c.Cache().Complete(g.Slot, g.Gen, nil)
			}
		})
	}
	st := c.Cache().Stats()
	assert.Equal(t, uint64(1), st[1].Hits)
	assert.Equal(t, uint64(4), st[0].Misses)
	assert.Equal(t, uint64(2), st[0].Loads)
}
