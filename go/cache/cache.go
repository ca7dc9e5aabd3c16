package cache

import (
	"errors"
	"fmt"
	"math"
	"sort"
	"sync"
)

// ErrClosed is returned by operations on a closed cache, and by waits that
// were interrupted by Close.
var ErrClosed = errors.New("cache: closed")

// ErrStopped is returned when a wait is abandoned because its stop channel
// was closed.
var ErrStopped = errors.New("cache: wait stopped")

// TooManyError is returned by Pin when one call asks for more distinct
// experts than the cache has slots; the caller must split the request.
type TooManyError struct {
	Want, Slots int
}

// Error says how many experts were asked for and how many slots exist.
func (e *TooManyError) Error() string {
	return fmt.Sprintf("cache: %d experts requested at once but the cache has %d slots", e.Want, e.Slots)
}

// Config configures a Cache.
type Config struct {
	// Slots is the number of expert slots (>= 1).
	Slots int
	// Layers is the number of MoE layers, used for per-layer statistics
	// and by the default scorer.
	Layers int
	// Policy chooses eviction victims.
	Policy Policy
	// Scorer supplies priorities and predictions; nil uses a scorer that
	// ranks by layer only.
	Scorer Scorer
}

// Grant is one key's outcome of Pin or ReservePrefetch.
type Grant struct {
	// Key is the expert.
	Key Key
	// Slot is the slot index that holds (or will hold) Key.
	Slot int
	// Gen is the slot's assignment generation; pass it to Complete.
	Gen uint64
	// Load is true when the caller owns filling the slot and must call
	// Complete(Slot, Gen, err) when done.
	Load bool
	// Hit is true when Key was already ready when requested.
	Hit  bool
	done <-chan struct{}
}

// Done is closed once the slot's load has finished (successfully or not).
// For a hit it is already closed.
func (g Grant) Done() <-chan struct{} { return g.done }

type slot struct {
	key        Key
	state      State
	pins       int32
	gen        uint64
	lastUse    uint64
	prefetched bool // filled by a prefetch and not used since
	byPrefetch bool // the current Loading was started by a prefetch
	done       chan struct{}
	err        error
}

var closedChan = func() chan struct{} { c := make(chan struct{}); close(c); return c }()

// Cache is the residency manager for a fixed set of equally sized slots.
// All methods are safe for concurrent use.
type Cache struct {
	mu      sync.Mutex
	cfg     Config
	scorer  Scorer
	slots   []slot
	index   map[Key]int
	freq    map[Key]uint64
	tick    uint64
	changed chan struct{}
	closed  bool
	stats   []LayerStats
}

// New creates a cache with every slot empty.
func New(cfg Config) (*Cache, error) {
	if cfg.Slots < 1 {
		return nil, fmt.Errorf("cache: need at least 1 slot, got %d", cfg.Slots)
	}
	if cfg.Layers < 1 {
		return nil, fmt.Errorf("cache: need at least 1 layer, got %d", cfg.Layers)
	}
	if cfg.Policy > PolicyLFU {
		return nil, fmt.Errorf("cache: unknown policy %d", cfg.Policy)
	}
	c := &Cache{
		cfg:     cfg,
		scorer:  cfg.Scorer,
		slots:   make([]slot, cfg.Slots),
		index:   make(map[Key]int, cfg.Slots),
		freq:    make(map[Key]uint64),
		changed: make(chan struct{}),
		stats:   make([]LayerStats, cfg.Layers),
	}
	if c.scorer == nil {
		c.scorer = uniformScorer{layers: cfg.Layers}
	}
	return c, nil
}

// Slots returns the number of slots.
func (c *Cache) Slots() int { return len(c.slots) }

// Policy returns the eviction policy.
func (c *Cache) Policy() Policy {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cfg.Policy
}

// notifyLocked wakes every goroutine waiting for a state change.
func (c *Cache) notifyLocked() {
	close(c.changed)
	c.changed = make(chan struct{})
}

// Pin makes every key resident (or loading) and pins it so that it is not
// evicted until Unpin. It is all or nothing: if there are not enough
// evictable slots for the keys that are not resident, Pin waits (without
// holding any pin) until there are, so concurrent callers cannot deadlock
// by each holding part of what they need. keys must be distinct. For each
// grant with Load set the caller must fill the slot and call Complete; for
// the others, wait on Done (see Wait) before using the slot.
//
// Pin fails with *TooManyError when len(keys) exceeds the number of slots,
// with ErrStopped when stop is closed first and with ErrClosed after Close.
func (c *Cache) Pin(keys []Key, stop <-chan struct{}) ([]Grant, error) {
	if len(keys) > len(c.slots) {
		return nil, &TooManyError{Want: len(keys), Slots: len(c.slots)}
	}
	for _, k := range keys {
		if err := c.checkKey(k); err != nil {
			return nil, err
		}
	}
	c.mu.Lock()
	for {
		if c.closed {
			c.mu.Unlock()
			return nil, ErrClosed
		}
		grants, ok := c.tryPinLocked(keys)
		c.checkLocked()
		if ok {
			c.mu.Unlock()
			return grants, nil
		}
		ch := c.changed
		c.mu.Unlock()
		select {
		case <-ch:
		case <-stop:
			return nil, ErrStopped
		}
		c.mu.Lock()
	}
}

func (c *Cache) checkKey(k Key) error {
	if k.Layer < 0 || int(k.Layer) >= c.cfg.Layers || k.Expert < 0 {
		return fmt.Errorf("cache: key %v out of range (%d layers)", k, c.cfg.Layers)
	}
	return nil
}

func (c *Cache) tryPinLocked(keys []Key) ([]Grant, bool) {
	need := 0
	for _, k := range keys {
		if i, ok := c.index[k]; !ok || c.slots[i].state == Empty {
			need++
		}
	}
	var victims []int
	if need > 0 {
		victims = c.victimsLocked(need, keys, -1)
		if len(victims) < need {
			return nil, false
		}
	}
	grants := make([]Grant, len(keys))
	vi := 0
	for n, k := range keys {
		c.tick++
		c.freq[k]++
		st := &c.stats[k.Layer]
		if i, ok := c.index[k]; ok && c.slots[i].state != Empty {
			s := &c.slots[i]
			s.pins++
			s.lastUse = c.tick
			g := Grant{Key: k, Slot: i, Gen: s.gen, done: s.done}
			if s.state == Ready {
				g.Hit = true
				g.done = closedChan
				st.Hits++
				if s.prefetched {
					st.PrefetchHits++
				}
			} else {
				st.Misses++
				if s.byPrefetch {
					st.LatePrefetches++
				}
			}
			s.prefetched = false
			grants[n] = g
			continue
		}
		i := victims[vi]
		vi++
		c.assignLocked(i, k, false)
		s := &c.slots[i]
		s.pins = 1
		s.lastUse = c.tick
		st.Misses++
		st.Loads++
		grants[n] = Grant{Key: k, Slot: i, Gen: s.gen, Load: true, done: s.done}
	}
	return grants, true
}

// assignLocked evicts whatever slot i holds and marks it Loading key k.
func (c *Cache) assignLocked(i int, k Key, prefetch bool) {
	s := &c.slots[i]
	if s.state != Empty {
		old := s.key
		delete(c.index, old)
		st := &c.stats[old.Layer]
		st.Evictions++
		if s.prefetched {
			st.WastedPrefetches++
		}
	}
	s.key = k
	s.state = Loading
	s.gen++
	s.prefetched = false
	s.byPrefetch = prefetch
	s.done = make(chan struct{})
	s.err = nil
	c.index[k] = i
}

// victimsLocked returns up to n evictable slots, best victims first: empty
// slots, then ready unpinned slots in policy order. Slots holding any of
// the keys in keep are skipped. When maxPredicted >= 0, slots whose expert
// is predicted at least that strongly are skipped too. It scans the slots
// once and keeps the n best in a bounded heap (O(slots · log n)); empty
// slots short-circuit the scoring.
func (c *Cache) victimsLocked(n int, keep []Key, maxPredicted float64) []int {
	if n <= 0 {
		return nil
	}
	var empties []int
	for i := range c.slots {
		if s := &c.slots[i]; s.state == Empty && s.pins == 0 {
			empties = append(empties, i)
			if len(empties) == n {
				return empties
			}
		}
	}
	h := victimHeap{n: n - len(empties)}
	for i := range c.slots {
		s := &c.slots[i]
		if s.pins > 0 || s.state != Ready || containsKey(keep, s.key) {
			continue
		}
		if maxPredicted >= 0 && c.scorer.Predicted(s.key) >= maxPredicted {
			continue
		}
		h.offer(victim{slot: i, last: s.lastUse, score: c.evictionScore(s)})
	}
	return append(empties, h.sorted()...)
}

// evictionScore is s's score under the cache's policy: the lowest score is
// evicted first (last use for LRU, use count for LFU, the scorer's priority
// otherwise).
func (c *Cache) evictionScore(s *slot) float64 {
	switch c.cfg.Policy {
	case PolicyLRU:
		return float64(s.lastUse)
	case PolicyLFU:
		return float64(c.freq[s.key])
	default:
		return c.scorer.Priority(s.key)
	}
}

// victim is an eviction candidate; lower sorts first.
type victim struct {
	slot  int
	score float64
	last  uint64
}

func (a victim) before(b victim) bool {
	if a.score != b.score {
		return a.score < b.score
	}
	if a.last != b.last {
		return a.last < b.last
	}
	return a.slot < b.slot
}

// victimHeap keeps the n best (lowest) victims offered, as a max-heap.
type victimHeap struct {
	n    int
	heap []victim
}

func (h *victimHeap) offer(v victim) {
	if h.n <= 0 {
		return
	}
	if len(h.heap) < h.n {
		h.heap = append(h.heap, v)
		for i := len(h.heap) - 1; i > 0; {
			p := (i - 1) / 2
			if !h.heap[p].before(h.heap[i]) {
				break
			}
			h.heap[p], h.heap[i] = h.heap[i], h.heap[p]
			i = p
		}
		return
	}
	if !v.before(h.heap[0]) {
		return
	}
	h.heap[0] = v
	for i := 0; ; {
		l, r, big := 2*i+1, 2*i+2, i
		if l < len(h.heap) && h.heap[big].before(h.heap[l]) {
			big = l
		}
		if r < len(h.heap) && h.heap[big].before(h.heap[r]) {
			big = r
		}
		if big == i {
			break
		}
		h.heap[i], h.heap[big] = h.heap[big], h.heap[i]
		i = big
	}
}

// sorted returns the kept victims' slots, best first.
func (h *victimHeap) sorted() []int {
	sort.Slice(h.heap, func(a, b int) bool { return h.heap[a].before(h.heap[b]) })
	out := make([]int, len(h.heap))
	for i, v := range h.heap {
		out[i] = v.slot
	}
	return out
}

func containsKey(keys []Key, k Key) bool {
	for _, x := range keys {
		if x == k {
			return true
		}
	}
	return false
}

// Wait blocks until g's slot has finished loading and returns the load's
// error, if any. It returns ErrStopped if stop is closed first.
func (c *Cache) Wait(g Grant, stop <-chan struct{}) error {
	select {
	case <-g.done:
	case <-stop:
		return ErrStopped
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	s := &c.slots[g.Slot]
	if s.gen != g.Gen {
		// Reassigned: only possible after a failed load released it.
		return fmt.Errorf("cache: load of %v failed", g.Key)
	}
	if s.state != Ready {
		if s.err != nil {
			return s.err
		}
		return fmt.Errorf("cache: load of %v failed", g.Key)
	}
	return nil
}

// Complete finishes the load of slot (generation gen). On success the slot
// becomes Ready; on error it becomes Empty and every waiter sees err.
func (c *Cache) Complete(slotIdx int, gen uint64, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if slotIdx < 0 || slotIdx >= len(c.slots) {
		return
	}
	s := &c.slots[slotIdx]
	if s.gen != gen || s.state != Loading {
		return
	}
	if err != nil {
		delete(c.index, s.key)
		s.state = Empty
		s.err = err
		s.prefetched = false
	} else {
		s.state = Ready
		s.prefetched = s.byPrefetch && s.pins == 0
	}
	s.byPrefetch = false
	close(s.done)
	c.checkLocked()
	c.notifyLocked()
}

// Unpin releases one pin on each granted slot.
func (c *Cache) Unpin(grants []Grant) {
	c.mu.Lock()
	defer c.mu.Unlock()
	woke := false
	for _, g := range grants {
		s := &c.slots[g.Slot]
		if s.pins <= 0 {
			panic(fmt.Sprintf("cache: unpin of unpinned slot %d (%v)", g.Slot, g.Key))
		}
		s.pins--
		if s.pins == 0 {
			woke = true
		}
	}
	c.checkLocked()
	if woke {
		c.notifyLocked()
	}
}

// ReservePrefetch reserves a slot for a prefetch of k whose predicted
// usefulness is score. It returns ok=false when k is already resident or
// loading, or when every evictable slot holds an expert predicted at least
// as strongly as k. On success the caller must fill the slot and call
// Complete. A prefetched slot is not pinned.
func (c *Cache) ReservePrefetch(k Key, score float64) (Grant, bool) {
	if c.checkKey(k) != nil {
		return Grant{}, false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	i, ok := c.victimForLocked(k, score)
	if !ok {
		return Grant{}, false
	}
	c.assignLocked(i, k, true)
	s := &c.slots[i]
	s.lastUse = c.tick
	c.stats[k.Layer].PrefetchLoads++
	c.checkLocked()
	return Grant{Key: k, Slot: i, Gen: s.gen, Load: true, done: s.done}, true
}

// Lookup reports k's slot and state (Empty when absent).
func (c *Cache) Lookup(k Key) (slotIdx int, st State) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if i, ok := c.index[k]; ok {
		return i, c.slots[i].state
	}
	return -1, Empty
}

// Resident returns the keys of every Ready slot.
func (c *Cache) Resident() []Key {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []Key
	for i := range c.slots {
		if c.slots[i].state == Ready {
			out = append(out, c.slots[i].key)
		}
	}
	return out
}

// Pinned returns the number of slots with at least one pin.
func (c *Cache) Pinned() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for i := range c.slots {
		if c.slots[i].pins > 0 {
			n++
		}
	}
	return n
}

// SetPolicy switches the eviction policy.
func (c *Cache) SetPolicy(p Policy) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.cfg.Policy = p
}

// Flush empties every ready slot that is not pinned (loading and pinned
// slots are left alone) and forgets use frequencies.
func (c *Cache) Flush() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i := range c.slots {
		s := &c.slots[i]
		if s.state == Ready && s.pins == 0 {
			delete(c.index, s.key)
			s.state = Empty
			s.prefetched = false
		}
	}
	c.freq = make(map[Key]uint64)
	c.checkLocked()
	c.notifyLocked()
}

// Close wakes every waiter with ErrClosed. Slots keep their state so that
// in-flight loads can still Complete.
func (c *Cache) Close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.closed {
		c.closed = true
		c.notifyLocked()
	}
}

// Touch records uses of keys that were computed without pinning (mapped
// mode): hit[i] says whether keys[i] was read from its slot. Hits refresh
// recency and frequency like Pin; misses count, and their frequency
// counts, so that Admit can weigh them.
func (c *Cache) Touch(keys []Key, hit []bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for n, k := range keys {
		if c.checkKey(k) != nil {
			continue
		}
		c.tick++
		c.freq[k]++
		st := &c.stats[k.Layer]
		i, ok := c.index[k]
		if ok && c.slots[i].state != Empty {
			s := &c.slots[i]
			s.lastUse = c.tick
			if hit[n] && s.prefetched {
				st.PrefetchHits++
			}
			s.prefetched = false
		}
		if hit[n] {
			st.Hits++
		} else {
			st.Misses++
		}
	}
}

// Admit decides whether k, just used while absent (a mapped-mode miss),
// should be brought in: yes when a slot is empty, or when the eviction
// policy ranks k above the best victim by more than margin (a fraction:
// 0.5 means 1.5 times the victim's score) — LRU: always, k was just used;
// LFU: k has been used more often; priority: k's priority is higher. On
// yes it reserves the victim's slot like ReservePrefetch, counted as a
// load. A margin keeps near-equal experts (uniform routing) from trading
// places on every miss, each trade being a copy over the link.
func (c *Cache) Admit(k Key, margin float64) (Grant, bool) {
	if c.checkKey(k) != nil {
		return Grant{}, false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	i, ok := c.victimForLocked(k, -1)
	if !ok {
		return Grant{}, false
	}
	if s := &c.slots[i]; s.state != Empty {
		mine := c.valueLocked(k)
		v := c.evictionScore(s)
		if c.cfg.Policy != PolicyLRU {
			v += math.Abs(v) * margin
		}
		if mine <= v {
			return Grant{}, false
		}
	}
	c.assignLocked(i, k, false)
	s := &c.slots[i]
	c.tick++
	s.lastUse = c.tick
	c.stats[k.Layer].Loads++
	c.checkLocked()
	return Grant{Key: k, Slot: i, Gen: s.gen, Load: true, done: s.done}, true
}

// Value is how the eviction policy values k against a resident expert's
// eviction score (Admit's side of the comparison): LRU the next use's
// recency (every expert alike), LFU k's use count, priority k's priority.
func (c *Cache) Value(k Key) float64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.valueLocked(k)
}

func (c *Cache) valueLocked(k Key) float64 {
	switch c.cfg.Policy {
	case PolicyLRU:
		return float64(c.tick + 1)
	case PolicyLFU:
		return float64(c.freq[k])
	default:
		return c.scorer.Priority(k)
	}
}

// victimForLocked is the slot that would take k (absent, cache open), the
// best victim whose prediction is below maxPredicted (see victimsLocked).
func (c *Cache) victimForLocked(k Key, maxPredicted float64) (int, bool) {
	if c.closed {
		return 0, false
	}
	if i, ok := c.index[k]; ok && c.slots[i].state != Empty {
		return 0, false
	}
	v := c.victimsLocked(1, nil, maxPredicted)
	if len(v) == 0 {
		return 0, false
	}
	return v[0], true
}
