// Package core is the offloading engine's synchronous decision core: the
// tracker (go/trace), the eviction scorer, the prefetch planner and its
// queue (go/prefetch) and the expert cache (go/cache), driven in one
// order. go/engine calls it under its own concurrency for every MoE layer
// and every request's end, and go/sim replays traces through the very same
// code, so that a replay and the engine cannot drift apart.
//
// The core decides and records; it does no I/O, no copies and starts no
// goroutines. Which experts of a layer are hits, which must be loaded and
// which slot each load evicts come back as cache grants, which the caller
// (the engine's backend, or the simulator's instant loads) fills and
// completes; which experts to prefetch are the plans it puts into its
// queue, which the caller drains.
//
// One MoE layer of a request batch is Layer:
//
//  1. Observe: each request's routing (tokens per expert) goes into its
//     expert-activation matrix, and the layer's activation priorities are
//     recomputed from the active requests (trace.Priorities).
//  2. use: the caller uses the layer's experts through the core (Pin, or
//     UseInPlace for experts read in place), performing the loads the
//     grants ask for.
//  3. Plan: with prefetching on, each request's partial EAM is matched
//     against the collection and its plan for the later layers replaces
//     its previous one in the queue.
//
// In mapped mode step 2 is UseInPlace: Touch counts the uses, then every
// miss is offered to the cache and the admitted ones have their slots
// reserved, all before the caller starts any of their copies.
//
// After a layer the planned experts are prefetched: TakePrefetch (or
// TryTakePrefetch) hands out the queue's best candidate, each planned
// expert once for as long as it stays planned, and ReservePrefetch decides
// whether it is loaded and into which slot; the caller loads the grant and
// then calls PrefetchDone. The engine's dispatcher does this
// asynchronously under its window; go/sim does it at once after each
// layer.
//
// A request ends with End: its plan is cancelled and its EAM retired into
// the collection.
//
// The cache's scorer is the core itself: an expert's priority is its
// activation priority plus its current planned score (Priority, Predicted).
package core

import (
	"cmp"
	"errors"
	"math"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/moe-infinity/moe_infinity/go/cache"
	"github.com/moe-infinity/moe_infinity/go/prefetch"
	"github.com/moe-infinity/moe_infinity/go/trace"
)

// HintOwnerBase marks prefetch-queue owners that are router hints (owner
// HintOwnerBase+layer, one per layer) rather than requests; request ids
// stay below it.
const HintOwnerBase = uint64(1) << 62

// Config configures a Core.
type Config struct {
	// Slots is the number of cache slots (>= 1).
	Slots int
	// Policy is the cache's eviction policy.
	Policy cache.Policy
	// Collection is the EAM collection requests are matched against and
	// retire into; its shape (layers × experts) is the model's.
	Collection *trace.Collection
	// Matches is the number of most similar stored EAMs the planner sums
	// (prefetch.Planner.Matches).
	Matches int
	// Confidence, MinEvidence and MinTokenShare are the planner's filters
	// (prefetch.Planner.Tune: 0 keeps a default, a negative value turns a
	// filter off). Dimensionless, tokens and a share of tokens.
	Confidence, MinEvidence, MinTokenShare float64
	// Prefetch turns planning on (SetPrefetch changes it later).
	Prefetch bool
	// Observed, when set, is called after each request's routing of a
	// layer has been recorded (counts: tokens per expert), under no lock
	// of the core's.
	Observed func(layer int, counts []float32)
}

// ObserveError is a request's routing the tracker refused (unknown or
// ended request, bad layer, wrong shape, invalid count). Err is the
// tracker's error.
type ObserveError struct {
	// Err is the tracker's error.
	Err error
}

// Error is the tracker's message.
func (e *ObserveError) Error() string { return e.Err.Error() }

// Unwrap returns the tracker's error.
func (e *ObserveError) Unwrap() error { return e.Err }

// Core is one model's decision core. Its methods are safe for concurrent
// use: the tracker, planner, queue and cache lock themselves, and priority
// updates are serialised by a lock of the core's while the cache reads
// them without one.
type Core struct {
	layers, experts int
	cache           *cache.Cache
	tracker         *trace.Tracker
	planner         *prefetch.Planner
	queue           *prefetch.Queue
	prefetchOn      atomic.Bool
	observed        func(layer int, counts []float32)

	prioMu  sync.Mutex      // serialises priority updates (readers take no lock)
	prio    []atomic.Uint64 // [layer*experts+expert] activation term of the priority (float64 bits)
	prioTmp []float64       // one layer's priorities being computed (under prioMu)
}

// New builds a core: a tracker and planner over cfg.Collection, an empty
// prefetch queue, the ε priority floor for every expert, and a cache of
// cfg.Slots slots scored by the core.
func New(cfg Config) (*Core, error) {
	if cfg.Collection == nil {
		return nil, errors.New("core: no EAM collection")
	}
	L, E := cfg.Collection.Layers(), cfg.Collection.Experts()
	c := &Core{
		layers: L, experts: E, observed: cfg.Observed,
		prio: make([]atomic.Uint64, L*E), prioTmp: make([]float64, E),
	}
	for l := 0; l < L; l++ {
		c.setPriorities(l, nil, 0)
	}
	ch, err := cache.New(cache.Config{Slots: cfg.Slots, Layers: L, Policy: cfg.Policy, Scorer: c})
	if err != nil {
		return nil, err
	}
	c.cache = ch
	c.tracker = trace.NewTracker(cfg.Collection)
	c.planner = prefetch.NewPlanner(cfg.Collection)
	c.planner.Matches = cfg.Matches
	c.planner.Tune(cfg.Confidence, cfg.MinEvidence, cfg.MinTokenShare)
	c.queue = prefetch.NewQueue()
	c.prefetchOn.Store(cfg.Prefetch)
	return c, nil
}

// Layers is the number of MoE layers.
func (c *Core) Layers() int { return c.layers }

// Experts is the number of experts per layer.
func (c *Core) Experts() int { return c.experts }

// Cache is the expert cache (the caller completes its loads).
func (c *Core) Cache() *cache.Cache { return c.cache }

// Tracker is the request tracker.
func (c *Core) Tracker() *trace.Tracker { return c.tracker }

// Planner is the prefetch planner.
func (c *Core) Planner() *prefetch.Planner { return c.planner }

// Queue is the prefetch queue the plans go into (the caller drains it).
func (c *Core) Queue() *prefetch.Queue { return c.queue }

// Prefetching reports whether planning is on.
func (c *Core) Prefetching() bool { return c.prefetchOn.Load() }

// SetPrefetch turns planning on or off; off also drops every plan.
func (c *Core) SetPrefetch(on bool) {
	c.prefetchOn.Store(on)
	if !on {
		c.queue.Clear()
	}
}

// Priority implements cache.Scorer: the paper's activation-aware priority
// p = (pEAM[l][x] + ε)/n_tokens(l) · LayerWeight(l) plus the expert's
// current planned score, so that an expert about to be used is not
// evicted to make room for one that is not. Dimensionless.
func (c *Core) Priority(k cache.Key) float64 {
	p := math.Float64frombits(c.prio[int(k.Layer)*c.experts+int(k.Expert)].Load())
	return p + c.queue.Score(k)
}

// Predicted implements cache.Scorer: k's score in the current plans (0
// when unplanned). Dimensionless.
func (c *Core) Predicted(k cache.Key) float64 { return c.queue.Score(k) }

// Begin starts tracing a new request and returns its id (never 0).
func (c *Core) Begin() uint64 { return c.tracker.Begin() }

// Layer is one MoE layer for reqs, counts[i] being the tokens request
// reqs[i] routed to each expert: Observe (skipped when reqs is empty),
// then use (when not nil: the caller pins or touches the layer's experts
// through the core and performs the loads), then Plan. An observe error
// (an *ObserveError) stops it before use; use's error is returned after
// planning. plans are Plan's.
func (c *Core) Layer(layer int, reqs []uint64, counts [][]float32, use func() error) (plans [][]prefetch.Candidate, err error) {
	if len(reqs) > 0 {
		if err := c.Observe(layer, reqs, counts); err != nil {
			return nil, err
		}
	}
	if use != nil {
		err = use()
	}
	return c.Plan(layer, reqs), err
}

// LayerReplayed is Layer for one layer of a replayed step (a captured
// decode step, whose layers all ran before their routing is traced):
// Observe, then use, without planning; PlanNext plans the step's next pass
// once, after its last layer.
func (c *Core) LayerReplayed(layer int, reqs []uint64, counts [][]float32, use func() error) error {
	if len(reqs) > 0 {
		if err := c.Observe(layer, reqs, counts); err != nil {
			return err
		}
	}
	if use != nil {
		return use()
	}
	return nil
}

// Observe records that in layer, request reqs[i] routed counts[i][x]
// tokens to expert x, then recomputes the layer's activation priorities
// from the active requests. It stops at the first routing the tracker
// refuses (an *ObserveError; the requests before it are recorded, the
// priorities not refreshed).
func (c *Core) Observe(layer int, reqs []uint64, counts [][]float32) error {
	for i, r := range reqs {
		if err := c.tracker.Observe(r, layer, counts[i]); err != nil {
			return &ObserveError{Err: err}
		}
		if c.observed != nil {
			c.observed(layer, counts[i])
		}
	}
	c.refresh(layer)
	return nil
}

// refresh recomputes layer's activation priorities from the tracker's
// active requests (nothing when they routed no tokens there).
func (c *Core) refresh(layer int) {
	per, tokens := c.tracker.LayerTotals(layer)
	if tokens <= 0 {
		return
	}
	c.prioMu.Lock()
	c.setPriorities(layer, per, tokens)
	c.prioMu.Unlock()
}

// setPriorities computes layer's priorities (trace.Priorities) and
// publishes them one expert at a time: the cache's eviction choices read
// them without a lock (a choice may see some experts' new values and
// others' old, as it may see either side of any update). Runs with prioMu
// held, or before the core is shared.
func (c *Core) setPriorities(layer int, per []float32, tokens float32) {
	trace.Priorities(c.prioTmp, per, tokens, layer, c.layers)
	for x, p := range c.prioTmp {
		c.prio[layer*c.experts+x].Store(math.Float64bits(p))
	}
}

// Plan re-plans, with prefetching on, each request's prefetches for the
// layers after layer from its partial EAM: the plan replaces the
// request's previous one in the queue. plans[i] is reqs[i]'s plan, best
// first (nil when prefetching is off, or for a request the tracker no
// longer knows, whose queued plan is left as it was).
func (c *Core) Plan(layer int, reqs []uint64) (plans [][]prefetch.Candidate) {
	if !c.prefetchOn.Load() || len(reqs) == 0 {
		return nil
	}
	plans = make([][]prefetch.Candidate, len(reqs))
	for i, r := range reqs {
		if plan, ok := c.planner.PlanRequest(c.tracker, r, layer); ok {
			c.queue.Update(r, plan)
			plans[i] = plan
		}
	}
	return plans
}

// PlanNext is Plan for every layer of each request's next pass (a replayed
// decode step, whose layers all ran before their routing was observed).
func (c *Core) PlanNext(reqs []uint64) {
	if !c.prefetchOn.Load() {
		return
	}
	for _, r := range reqs {
		if plan, ok := c.planner.PlanNextRequest(c.tracker, r); ok {
			c.queue.Update(r, plan)
		}
	}
}

// Hint plans experts of layer ahead of any EAM prediction (a router run
// ahead), replacing the layer's previous hint, with prefetching on. The
// caller checks the ids.
func (c *Core) Hint(layer int, experts []int32) {
	if c.prefetchOn.Load() {
		c.queue.Update(HintOwnerBase+uint64(layer), prefetch.HintCandidates(layer, experts))
	}
}

// Pin makes the distinct keys (all of layer) the layer's on-demand
// accesses: the layer's hint is spent, then cache.Pin counts each key a
// hit or a miss, reserves (evicting as the policy chooses) a slot for each
// miss and pins them all. The caller loads every grant with Load set,
// completes it (cache.Cache.Complete), waits for the others not Hit, and
// unpins them when the computation is done. stop as in cache.Pin.
func (c *Core) Pin(layer int, keys []cache.Key, stop <-chan struct{}) ([]cache.Grant, error) {
	if c.prefetchOn.Load() {
		c.queue.Update(HintOwnerBase+uint64(layer), nil)
	}
	return c.cache.Pin(keys, stop)
}

// Touch counts accesses of experts computed where they are (mapped mode):
// hit[i] says whether keys[i] was read from its slot (cache.Touch).
func (c *Core) Touch(keys []cache.Key, hit []bool) { c.cache.Touch(keys, hit) }

// UseInPlace is the use of a layer whose experts were computed where they
// are (mapped mode; keys distinct, of one layer): hit[i] says whether
// keys[i] was read from its slot. Touch counts every use, then each miss,
// in keys' order, is offered to the cache (cache.Admit with margin,
// dimensionless), and the admitted ones come back as grants whose slots
// are reserved. Every admission of the layer is decided before any of its
// copies starts, so that a layer's admissions never evict one another
// whatever the copies' speed; the caller loads each grant and completes
// it. At most most misses are admitted (most < 0: no bound): the caller's
// room on the link for them now; when that is fewer than the misses, they
// are offered in the order the eviction policy values them (cache.Value,
// highest first; ties in keys' order).
func (c *Core) UseInPlace(keys []cache.Key, hit []bool, margin float64, most int) []cache.Grant {
	c.cache.Touch(keys, hit)
	var misses []cache.Key
	for i, k := range keys {
		if !hit[i] {
			misses = append(misses, k)
		}
	}
	if most >= 0 && len(misses) > most {
		value := make(map[cache.Key]float64, len(misses))
		for _, k := range misses {
			value[k] = c.cache.Value(k)
		}
		slices.SortStableFunc(misses, func(a, b cache.Key) int { return cmp.Compare(value[b], value[a]) })
	}
	var grants []cache.Grant
	for _, k := range misses {
		if most >= 0 && len(grants) >= most {
			break
		}
		if g, ok := c.cache.Admit(k, margin); ok {
			grants = append(grants, g)
		}
	}
	return grants
}

// TakePrefetch blocks until a planned expert is queued and takes the best
// one (prefetch.Queue.Pop: highest score first, then earlier layer, then
// lower expert). Each planned expert is taken once for as long as it stays
// planned: a taken expert that is evicted later is not taken again unless
// a newer plan drops it and plans it anew. ok is false once stop is closed
// or the queue closed. A taken candidate goes to ReservePrefetch; the
// caller calls PrefetchDone when it is finished with it (or gives it up).
func (c *Core) TakePrefetch(stop <-chan struct{}) (prefetch.Candidate, bool) {
	return c.queue.Pop(stop)
}

// TryTakePrefetch is TakePrefetch without waiting: ok is false when
// nothing is queued.
func (c *Core) TryTakePrefetch() (prefetch.Candidate, bool) { return c.queue.TryPop() }

// ReservePrefetch decides whether a taken candidate is loaded: it reserves
// a slot for it (cache.ReservePrefetch with the candidate's score) unless
// the expert is resident or loading, or every evictable slot holds an
// expert predicted at least as strongly. A refused candidate is dropped
// (its PrefetchDone is done here); an accepted one is loaded by the
// caller, who completes the grant and then calls PrefetchDone.
func (c *Core) ReservePrefetch(cand prefetch.Candidate) (cache.Grant, bool) {
	g, ok := c.cache.ReservePrefetch(cand.Key, cand.Score)
	if !ok {
		c.queue.Done()
	}
	return g, ok
}

// PrefetchDone marks the handling of one taken candidate finished (its
// load completed, or the caller gave it up), so that the queue can report
// itself idle (prefetch.Queue.Done).
func (c *Core) PrefetchDone() { c.queue.Done() }

// End ends request req: its plan is cancelled and its EAM retired into
// the collection. The error is the tracker's (an unknown or ended req).
func (c *Core) End(req uint64) error {
	c.queue.Update(req, nil)
	return c.tracker.End(req)
}
