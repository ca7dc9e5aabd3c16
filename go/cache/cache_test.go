package cache

import (
	"errors"
	"math/rand"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func newCache(t *testing.T, slots, layers int, p Policy, s Scorer) *Cache {
	t.Helper()
	c, err := New(Config{Slots: slots, Layers: layers, Policy: p, Scorer: s})
	require.NoError(t, err)
	return c
}

// use pins k, fills it if needed, and unpins it; it reports whether it hit.
func use(t *testing.T, c *Cache, keys ...Key) []Grant {
	t.Helper()
	gs, err := c.Pin(keys, nil)
	require.NoError(t, err)
	for _, g := range gs {
		if g.Load {
			c.Complete(g.Slot, g.Gen, nil)
		}
		require.NoError(t, c.Wait(g, nil))
	}
	c.Unpin(gs)
	return gs
}

func TestParsePolicy(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Policy
		err  string
	}{
		{"priority", PolicyPriority, ""},
		{"lru", PolicyLRU, ""},
		{"lfu", PolicyLFU, ""},
		{"fifo", 0, `unknown cache policy "fifo" (supported: priority, lru, lfu)`},
		{"", 0, `unknown cache policy "" (supported: priority, lru, lfu)`},
		{" ", 0, `unknown cache policy " " (supported: priority, lru, lfu)`},
		{"LRU", 0, `unknown cache policy "LRU" (supported: priority, lru, lfu)`},
		{" lfu ", 0, `unknown cache policy " lfu " (supported: priority, lru, lfu)`},
		{"lru\n", 0, `unknown cache policy "lru\n" (supported: priority, lru, lfu)`},
	} {
		t.Run(tc.in, func(t *testing.T) {
			p, err := ParsePolicy(tc.in)
			if tc.err != "" {
				require.EqualError(t, err, tc.err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, p)
			back, err := ParsePolicy(p.String())
			require.NoError(t, err)
			assert.Equal(t, p, back)
		})
	}
	assert.Equal(t, "Policy(9)", Policy(9).String())
}

func TestNewRejectsBadConfig(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  Config
		err  string
	}{
		{"no slots", Config{Slots: 0, Layers: 1}, "need at least 1 slot"},
		{"no layers", Config{Slots: 1, Layers: 0}, "need at least 1 layer"},
		{"bad policy", Config{Slots: 1, Layers: 1, Policy: 7}, "unknown policy"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := New(tc.cfg)
			require.ErrorContains(t, err, tc.err)
		})
	}
}

func TestHitsAndMissesAddUpToUses(t *testing.T) {
	c := newCache(t, 2, 2, PolicyLRU, nil)
	a, b, d := Key{0, 0}, Key{0, 1}, Key{1, 0}
	gs := use(t, c, a, b)
	assert.False(t, gs[0].Hit)
	assert.True(t, gs[0].Load)
	gs = use(t, c, a)
	assert.True(t, gs[0].Hit)
	use(t, c, d) // evicts b (LRU)
	gs = use(t, c, b)
	assert.False(t, gs[0].Hit)

	st := c.Stats()
	var total LayerStats
	for _, s := range st {
		total.Add(s)
	}
	assert.Equal(t, uint64(5), total.Hits+total.Misses)
	assert.Equal(t, uint64(1), total.Hits)
	assert.Equal(t, uint64(4), total.Loads)
	assert.Equal(t, uint64(2), total.Evictions)
	c.ResetStats()
	assert.Equal(t, LayerStats{}, c.Stats()[0])
}

// cyclic runs `rounds` passes over layers 0..layers-1 using expert 0 of
// each and returns the number of hits per layer.
func cyclic(t *testing.T, c *Cache, layers, rounds int) []int {
	hits := make([]int, layers)
	for r := 0; r < rounds; r++ {
		for l := 0; l < layers; l++ {
			if use(t, c, Key{int32(l), 0})[0].Hit {
				hits[l]++
			}
		}
	}
	return hits
}

func TestPriorityPolicyKeepsEarlyLayersWhereLRUThrashes(t *testing.T) {
	const layers, slots, rounds = 8, 4, 5
	lru := cyclic(t, newCache(t, slots, layers, PolicyLRU, nil), layers, rounds)
	prio := cyclic(t, newCache(t, slots, layers, PolicyPriority, nil), layers, rounds)

	assert.Equal(t, make([]int, layers), lru, "LRU must miss every access under cyclic access larger than the cache")
	total := 0
	for l, h := range prio {
		total += h
		if l < slots-1 {
			assert.Equal(t, rounds-1, h, "layer %d should hit on every round after the first", l)
		}
	}
	assert.Equal(t, (slots-1)*(rounds-1), total)
}

type mapScorer struct {
	prio map[Key]float64
	pred map[Key]float64
}

func (m mapScorer) Priority(k Key) float64  { return m.prio[k] }
func (m mapScorer) Predicted(k Key) float64 { return m.pred[k] }

func TestPriorityPolicyEvictsLowestScore(t *testing.T) {
	s := mapScorer{prio: map[Key]float64{{0, 0}: 0.9, {0, 1}: 0.1, {0, 2}: 0.5}}
	c := newCache(t, 2, 1, PolicyPriority, s)
	use(t, c, Key{0, 0})
	use(t, c, Key{0, 1})
	use(t, c, Key{0, 2}) // evicts {0,1}, the lowest
	_, st := c.Lookup(Key{0, 1})
	assert.Equal(t, Empty, st)
	_, st = c.Lookup(Key{0, 0})
	assert.Equal(t, Ready, st)
}

func TestLFUKeepsFrequentExperts(t *testing.T) {
	c := newCache(t, 2, 1, PolicyLFU, nil)
	hot, cold := Key{0, 0}, Key{0, 1}
	for i := 0; i < 5; i++ {
		use(t, c, hot)
	}
	use(t, c, cold)
	use(t, c, Key{0, 2}) // LRU would evict hot; LFU evicts cold
	_, st := c.Lookup(hot)
	assert.Equal(t, Ready, st)
	_, st = c.Lookup(cold)
	assert.Equal(t, Empty, st)
}

func TestPinnedSlotsAreNeverEvicted(t *testing.T) {
	c := newCache(t, 2, 1, PolicyLRU, nil)
	gs, err := c.Pin([]Key{{0, 0}, {0, 1}}, nil)
	require.NoError(t, err)
	for _, g := range gs {
		c.Complete(g.Slot, g.Gen, nil)
	}
	// Every slot is pinned: a third expert must wait.
	got := make(chan []Grant, 1)
	go func() {
		g, err := c.Pin([]Key{{0, 2}}, nil)
		assert.NoError(t, err)
		got <- g
	}()
	select {
	case <-got:
		t.Fatal("Pin evicted a pinned slot")
	case <-time.After(50 * time.Millisecond):
	}
	_, st := c.Lookup(Key{0, 0})
	assert.Equal(t, Ready, st)
	c.Unpin(gs[:1]) // release {0,0} only
	g3 := <-got
	assert.Equal(t, gs[0].Slot, g3[0].Slot, "the unpinned slot is the one reused")
	_, st = c.Lookup(Key{0, 1})
	assert.Equal(t, Ready, st, "the still-pinned expert survives")
	c.Complete(g3[0].Slot, g3[0].Gen, nil)
	c.Unpin(g3)
	c.Unpin(gs[1:])
	assert.Equal(t, 0, c.Pinned())
}

func TestPinIsAllOrNothing(t *testing.T) {
	c := newCache(t, 2, 1, PolicyLRU, nil)
	held, err := c.Pin([]Key{{0, 0}}, nil)
	require.NoError(t, err)
	c.Complete(held[0].Slot, held[0].Gen, nil)
	// Needs two new slots, only one is free: must not pin the free one while waiting.
	stop := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		_, err := c.Pin([]Key{{0, 1}, {0, 2}}, stop)
		done <- err
	}()
	time.Sleep(20 * time.Millisecond)
	assert.Equal(t, 1, c.Pinned(), "a waiting Pin holds no pins")
	close(stop)
	require.ErrorIs(t, <-done, ErrStopped)
	c.Unpin(held)
}

func TestPinRejectsMoreKeysThanSlots(t *testing.T) {
	c := newCache(t, 2, 1, PolicyLRU, nil)
	_, err := c.Pin([]Key{{0, 0}, {0, 1}, {0, 2}}, nil)
	var tm *TooManyError
	require.ErrorAs(t, err, &tm)
	assert.Equal(t, 3, tm.Want)
	assert.Equal(t, 2, tm.Slots)
	assert.Contains(t, err.Error(), "3 experts requested at once but the cache has 2 slots")
	_, err = c.Pin([]Key{{5, 0}}, nil)
	require.ErrorContains(t, err, "out of range")
}

func TestConcurrentRequestersShareOneLoad(t *testing.T) {
	c := newCache(t, 2, 1, PolicyLRU, nil)
	k := Key{0, 0}
	first, err := c.Pin([]Key{k}, nil)
	require.NoError(t, err)
	require.True(t, first[0].Load)
	second, err := c.Pin([]Key{k}, nil)
	require.NoError(t, err)
	assert.False(t, second[0].Load, "an in-flight load is shared, not repeated")
	assert.Equal(t, first[0].Slot, second[0].Slot)
	select {
	case <-second[0].Done():
		t.Fatal("ready before the load completed")
	default:
	}
	c.Complete(first[0].Slot, first[0].Gen, nil)
	require.NoError(t, c.Wait(second[0], nil))
	c.Unpin(first)
	c.Unpin(second)
	assert.Equal(t, uint64(1), c.Stats()[0].Loads)
}

func TestFailedLoadIsReportedAndSlotFreed(t *testing.T) {
	c := newCache(t, 1, 1, PolicyLRU, nil)
	gs, err := c.Pin([]Key{{0, 0}}, nil)
	require.NoError(t, err)
	waiter, err := c.Pin([]Key{{0, 0}}, nil)
	require.NoError(t, err)
	boom := errors.New("disk on fire")
	c.Complete(gs[0].Slot, gs[0].Gen, boom)
	c.Complete(gs[0].Slot, gs[0].Gen, nil) // stale completion is ignored
	require.ErrorIs(t, c.Wait(waiter[0], nil), boom)
	c.Unpin(gs)
	c.Unpin(waiter)
	_, st := c.Lookup(Key{0, 0})
	assert.Equal(t, Empty, st)
	// The slot is reusable.
	gs = use(t, c, Key{0, 1})
	assert.True(t, gs[0].Load)
}

func TestUnpinOfUnpinnedSlotPanics(t *testing.T) {
	c := newCache(t, 1, 1, PolicyLRU, nil)
	gs := use(t, c, Key{0, 0})
	assert.Panics(t, func() { c.Unpin(gs) })
}

func TestPrefetchHitsAndWaste(t *testing.T) {
	s := mapScorer{pred: map[Key]float64{}}
	c := newCache(t, 2, 2, PolicyLRU, s)
	k := Key{1, 3}
	g, ok := c.ReservePrefetch(k, 0.5)
	require.True(t, ok)
	_, ok = c.ReservePrefetch(k, 0.5)
	assert.False(t, ok, "already loading")
	c.Complete(g.Slot, g.Gen, nil)
	gs := use(t, c, k)
	assert.True(t, gs[0].Hit)
	st := c.Stats()[1]
	assert.Equal(t, uint64(1), st.PrefetchHits)
	assert.Equal(t, uint64(1), st.PrefetchLoads)

	// A prefetch evicted before use is wasted.
	w, ok := c.ReservePrefetch(Key{0, 1}, 0.5)
	require.True(t, ok)
	c.Complete(w.Slot, w.Gen, nil)
	use(t, c, Key{0, 2})
	use(t, c, Key{0, 3})
	assert.Equal(t, uint64(1), c.Stats()[0].WastedPrefetches)
}

func TestLatePrefetchCountsAsMiss(t *testing.T) {
	c := newCache(t, 1, 1, PolicyLRU, nil)
	g, ok := c.ReservePrefetch(Key{0, 0}, 1)
	require.True(t, ok)
	gs, err := c.Pin([]Key{{0, 0}}, nil)
	require.NoError(t, err)
	assert.False(t, gs[0].Load)
	c.Complete(g.Slot, g.Gen, nil)
	require.NoError(t, c.Wait(gs[0], nil))
	c.Unpin(gs)
	st := c.Stats()[0]
	assert.Equal(t, uint64(1), st.Misses)
	assert.Equal(t, uint64(1), st.LatePrefetches)
	assert.Equal(t, uint64(0), st.PrefetchHits)
}

func TestPrefetchNeverEvictsBetterPredictedExperts(t *testing.T) {
	s := mapScorer{pred: map[Key]float64{{0, 0}: 0.9}}
	c := newCache(t, 1, 1, PolicyLRU, s)
	use(t, c, Key{0, 0})
	_, ok := c.ReservePrefetch(Key{0, 1}, 0.5)
	assert.False(t, ok, "victim is predicted more strongly than the candidate")
	_, ok = c.ReservePrefetch(Key{0, 1}, 0.95)
	assert.True(t, ok)
	_, ok = c.ReservePrefetch(Key{9, 1}, 0.95)
	assert.False(t, ok, "out-of-range key")
}

func TestCloseWakesWaiters(t *testing.T) {
	c := newCache(t, 1, 1, PolicyLRU, nil)
	held, err := c.Pin([]Key{{0, 0}}, nil)
	require.NoError(t, err)
	done := make(chan error, 1)
	go func() {
		_, err := c.Pin([]Key{{0, 1}}, nil)
		done <- err
	}()
	time.Sleep(10 * time.Millisecond)
	c.Close()
	c.Close()
	require.ErrorIs(t, <-done, ErrClosed)
	_, ok := c.ReservePrefetch(Key{0, 2}, 1)
	assert.False(t, ok)
	c.Complete(held[0].Slot, held[0].Gen, nil) // in-flight loads may still finish
	c.Unpin(held)
}

func TestWaitStops(t *testing.T) {
	c := newCache(t, 1, 1, PolicyLRU, nil)
	gs, err := c.Pin([]Key{{0, 0}}, nil)
	require.NoError(t, err)
	stop := make(chan struct{})
	close(stop)
	require.ErrorIs(t, c.Wait(gs[0], stop), ErrStopped)
}

func TestConcurrentPinCompleteUnpinPrefetch(t *testing.T) {
	const layers, experts, slots = 4, 8, 6
	c := newCache(t, slots, layers, PolicyPriority, nil)
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func(seed int64) {
			defer wg.Done()
			rng := rand.New(rand.NewSource(seed))
			for i := 0; i < 400; i++ {
				if rng.Intn(4) == 0 {
					k := Key{int32(rng.Intn(layers)), int32(rng.Intn(experts))}
					if g, ok := c.ReservePrefetch(k, rng.Float64()); ok {
						c.Complete(g.Slot, g.Gen, nil)
					}
					continue
				}
				n := 1 + rng.Intn(2)
				seen := map[Key]bool{}
				var keys []Key
				for len(keys) < n {
					k := Key{int32(rng.Intn(layers)), int32(rng.Intn(experts))}
					if !seen[k] {
						seen[k] = true
						keys = append(keys, k)
					}
				}
				gs, err := c.Pin(keys, nil)
				if !assert.NoError(t, err) {
					return
				}
				for _, g := range gs {
					if g.Load {
						var err error
						if rng.Intn(50) == 0 {
							err = errors.New("injected")
						}
						c.Complete(g.Slot, g.Gen, err)
					}
				}
				for _, g := range gs {
					_ = c.Wait(g, nil)
				}
				c.Unpin(gs)
			}
		}(int64(w))
	}
	wg.Wait()
	assert.Equal(t, 0, c.Pinned())
	var total LayerStats
	for _, s := range c.Stats() {
		total.Add(s)
	}
	assert.Greater(t, total.Hits+total.Misses, uint64(0))
	assert.LessOrEqual(t, len(c.Resident()), slots)
}

func TestStateAndKeyStrings(t *testing.T) {
	assert.Equal(t, "L2/E7", Key{2, 7}.String())
	assert.Equal(t, "empty", Empty.String())
	assert.Equal(t, "loading", Loading.String())
	assert.Equal(t, "ready", Ready.String())
	assert.Equal(t, "State(9)", State(9).String())
	assert.Equal(t, 3, newCache(t, 3, 1, PolicyLFU, nil).Slots())
	assert.Equal(t, PolicyLFU, newCache(t, 3, 1, PolicyLFU, nil).Policy())
}

func TestFlushEmptiesUnpinnedSlotsAndSetPolicy(t *testing.T) {
	c := newCache(t, 3, 1, PolicyLRU, nil)
	use(t, c, Key{0, 0})
	held, err := c.Pin([]Key{{0, 1}}, nil)
	require.NoError(t, err)
	c.Complete(held[0].Slot, held[0].Gen, nil)
	c.Flush()
	_, st := c.Lookup(Key{0, 0})
	assert.Equal(t, Empty, st)
	_, st = c.Lookup(Key{0, 1})
	assert.Equal(t, Ready, st, "pinned slots survive a flush")
	c.Unpin(held)
	c.SetPolicy(PolicyLFU)
	assert.Equal(t, PolicyLFU, c.Policy())
}

// TestVictimSelectionMatchesAFullSort checks the bounded-heap victim
// selection against sorting every candidate, on random cache states.
func TestVictimSelectionMatchesAFullSort(t *testing.T) {
	rng := rand.New(rand.NewSource(3))
	for round := 0; round < 200; round++ {
		slots := 1 + rng.Intn(40)
		s := mapScorer{prio: map[Key]float64{}, pred: map[Key]float64{}}
		c := newCache(t, slots, 4, Policy(rng.Intn(3)), s)
		for i := range c.slots {
			k := Key{int32(rng.Intn(4)), int32(i)}
			switch rng.Intn(5) {
			case 0:
				continue // empty
			case 1:
				c.slots[i].state = Loading
			default:
				c.slots[i].state = Ready
			}
			c.slots[i].key = k
			c.slots[i].pins = int32(rng.Intn(3) / 2)
			c.slots[i].lastUse = uint64(rng.Intn(10))
			c.index[k] = i
			c.freq[k] = uint64(rng.Intn(4))
			s.prio[k] = float64(rng.Intn(5)) / 4
			s.pred[k] = float64(rng.Intn(3)) / 2
		}
		n := 1 + rng.Intn(slots)
		maxPred := -1.0
		if rng.Intn(2) == 0 {
			maxPred = 0.5
		}
		var keep []Key
		if rng.Intn(2) == 0 {
			keep = []Key{c.slots[rng.Intn(slots)].key}
		}
		got := c.victimsLocked(n, keep, maxPred)
		want := bruteVictims(c, n, keep, maxPred)
		if len(want) == 0 {
			assert.Empty(t, got, "round %d", round)
			continue
		}
		assert.Equal(t, want, got, "round %d", round)
	}
}

func bruteVictims(c *Cache, n int, keep []Key, maxPred float64) []int {
	type cand struct {
		slot  int
		empty bool
		v     victim
	}
	var cs []cand
	for i := range c.slots {
		s := &c.slots[i]
		if s.pins > 0 || s.state == Loading {
			continue
		}
		if s.state == Empty {
			cs = append(cs, cand{slot: i, empty: true})
			continue
		}
		if containsKey(keep, s.key) || (maxPred >= 0 && c.scorer.Predicted(s.key) >= maxPred) {
			continue
		}
		v := victim{slot: i, last: s.lastUse, score: c.evictionScore(s)}
		cs = append(cs, cand{slot: i, v: v})
	}
	sort.Slice(cs, func(a, b int) bool {
		if cs[a].empty != cs[b].empty {
			return cs[a].empty
		}
		if cs[a].empty {
			return cs[a].slot < cs[b].slot
		}
		return cs[a].v.before(cs[b].v)
	})
	if len(cs) > n {
		cs = cs[:n]
	}
	out := []int{}
	for _, c := range cs {
		out = append(out, c.slot)
	}
	return out
}

func TestAdmitWeighsAMissAgainstTheBestVictim(t *testing.T) {
	s := mapScorer{prio: map[Key]float64{{0, 0}: 0.2, {0, 1}: 0.3, {0, 2}: 0.5, {0, 3}: 0.9}}
	tests := []struct {
		name   string
		policy Policy
		key    Key
		margin float64
		admit  bool
	}{
		{"priority above the victim", PolicyPriority, Key{0, 2}, 0, true},
		{"priority above, within the margin", PolicyPriority, Key{0, 2}, 1, false},
		{"priority above the margin", PolicyPriority, Key{0, 3}, 1, true},
		{"priority below the victim", PolicyPriority, Key{0, 0}, 0, false},
		{"lru admits the latest use whatever the margin", PolicyLRU, Key{0, 0}, 10, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := newCache(t, 1, 1, tc.policy, s)
			g, ok := c.Admit(Key{0, 1}, tc.margin)
			require.True(t, ok, "an empty slot always admits")
			c.Complete(g.Slot, g.Gen, nil)
			_, ok = c.Admit(Key{0, 1}, 0)
			assert.False(t, ok, "already resident")
			g, ok = c.Admit(tc.key, tc.margin)
			assert.Equal(t, tc.admit, ok)
			if ok {
				assert.True(t, g.Load)
				_, st := c.Lookup(Key{0, 1})
				assert.Equal(t, Empty, st, "the victim was evicted")
			}
		})
	}
	c := newCache(t, 1, 1, PolicyLFU, nil)
	c.Touch([]Key{{0, 0}, {0, 0}, {0, 0}}, []bool{false, false, false})
	g, _ := c.Admit(Key{0, 0}, 0)
	c.Complete(g.Slot, g.Gen, nil)
	c.Touch([]Key{{0, 1}}, []bool{false})
	_, ok := c.Admit(Key{0, 1}, 0)
	assert.False(t, ok, "lfu: used once against three times")
	st := c.Stats()[0]
	assert.Equal(t, uint64(4), st.Misses)
	assert.Equal(t, uint64(1), st.Loads)
}
