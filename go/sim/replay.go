package sim

import (
	"cmp"
	"errors"
	"fmt"
	"math"
	"slices"

	"github.com/moe-infinity/moe_infinity/go/cache"
	"github.com/moe-infinity/moe_infinity/go/core"
	"github.com/moe-infinity/moe_infinity/go/trace"
)

// Engine defaults (go/engine Config) used when ReplayConfig leaves them 0.
const (
	// DefaultEAMCCapacity is the default number of EAMs in the collection.
	DefaultEAMCCapacity = 1000
	// DefaultMatches is the default number of most similar EAMs summed to
	// predict.
	DefaultMatches = 4
)

// ReplayConfig configures one replay.
type ReplayConfig struct {
	// Slots is the number of cache slots; at least the trace's largest
	// per-layer expert group (Trace.MaxGroup).
	Slots int `json:"slots"`
	// Policy is the cache's eviction policy.
	Policy cache.Policy `json:"policy"`
	// Prefetch turns on trace-driven prefetching.
	Prefetch bool `json:"prefetch"`
	// PrefetchPerLayer is the most prefetch loads the dispatcher makes
	// after each layer (0: the trace's TopK, i.e. Trace.MaxGroup; must not
	// be negative): the replay's stand-in for the link time the engine's
	// dispatcher has while one layer runs. Candidates beyond it stay
	// queued for the next layer, as in the engine's queue while its
	// dispatcher is busy; one at least the queue's length (layers ×
	// experts) is a dispatcher that keeps up.
	PrefetchPerLayer int `json:"prefetch_per_layer"`
	// EAMCCapacity is the EAM collection's capacity (0: 1000, the
	// engine's default).
	EAMCCapacity int `json:"eamc_capacity"`
	// Matches is the number of most similar stored EAMs the planner sums
	// (0: 4, the engine's default).
	Matches int `json:"matches"`
	// PrefetchConfidence mirrors the engine's setting of the same name: an
	// expert is planned only when predicted at least this many times as
	// likely as a uniform guess (see prefetch.Planner.Confidence). 0 keeps
	// the planner's default (prefetch.DefaultConfidence); a negative value
	// turns the filter off.
	PrefetchConfidence float64 `json:"prefetch_confidence"`
	// PrefetchMinEvidence mirrors the engine's setting of the same name: a
	// layer's prediction is used only when it rests on at least this many
	// routed tokens in the matched EAMs (see
	// prefetch.Planner.MinEvidence). 0 keeps the planner's default
	// (prefetch.DefaultMinEvidence); a negative value turns the filter off.
	PrefetchMinEvidence float64 `json:"prefetch_min_evidence"`
	// Mapped replays the engine's mapped mode: a miss is read in place
	// (not loaded) and the expert is brought in only when the cache admits
	// it with AdmitMargin (core.UseInPlace); link traffic is then misses +
	// loads.
	Mapped bool `json:"mapped,omitempty"`
	// AdmitMargin is the admission margin in mapped mode (cache.Admit's;
	// the engine's default is 1).
	AdmitMargin float64 `json:"admit_margin,omitempty"`
	// FillOnRead models admission without a copy in mapped mode: an
	// admitted expert's slot is reserved, and the next computation that
	// reads the expert over the link (another miss) also writes it into
	// the slot, so admissions are left out of LinkPerAccess but each costs
	// one more miss. A what-if for a design not built yet.
	FillOnRead bool `json:"fill_on_read,omitempty"`
	// PrefetchMinTokenShare mirrors the engine's setting of the same name
	// (see prefetch.Planner.MinTokenShare): 0 keeps the planner's default,
	// a negative value turns the filter off.
	PrefetchMinTokenShare float64 `json:"prefetch_min_token_share"`
	// PerRequest records each request's own hit rate in
	// Result.RequestHitRates (to see, for example, how many requests the
	// EAM collection needs after a switch of workload).
	PerRequest bool `json:"per_request,omitempty"`
}

// Result summarises one replay (or the Belady bound, Policy
// "belady-optimal").
//
// Every access (one expert of one token in one layer) is exactly one hit or
// one miss; prefetched experts count as hits when first used. The prefetch
// figures are defined as:
//
//	PrefetchPrecision = PrefetchHits / PrefetchLoads
//	    the fraction of prefetched experts that were used before being
//	    evicted (an expert still resident and unused at the end counts as
//	    not used); 0 when nothing was prefetched.
//	PrefetchRecall = PrefetchHits / (PrefetchHits + Misses)
//	    of the accesses that did not find the expert resident from an
//	    earlier use (they either hit a not yet used prefetched expert or
//	    missed), the fraction a prefetch covered; 0 when there were none.
type Result struct {
	// Label is the trace's label.
	Label string `json:"label"`
	// Policy is the eviction policy's name, or "belady-optimal".
	Policy string `json:"policy"`
	// Prefetch reports whether prefetching was on.
	Prefetch bool `json:"prefetch"`
	// Slots is the number of cache slots.
	Slots int `json:"slots"`
	// Accesses is the number of expert uses (Hits + Misses).
	Accesses uint64 `json:"accesses"`
	// Hits counts uses that found the expert resident.
	Hits uint64 `json:"hits"`
	// Misses counts uses that had to load the expert on demand.
	Misses uint64 `json:"misses"`
	// HitRate is Hits / Accesses (0 for no accesses).
	HitRate float64 `json:"hit_rate"`
	// Loads counts experts copied in on use: every miss without Mapped,
	// admitted misses with it.
	Loads uint64 `json:"loads"`
	// Evictions counts experts evicted to make room for a load, a
	// prefetch or an admission.
	Evictions uint64 `json:"evictions"`
	// LinkPerAccess is the expert transfers over the host link per access:
	// (Loads + PrefetchLoads + in-place reads of misses in mapped mode) /
	// Accesses — what bounds a PCIe-bound decode.
	LinkPerAccess float64 `json:"link_per_access"`
	// PrefetchLoads counts experts loaded by prefetching.
	PrefetchLoads uint64 `json:"prefetch_loads"`
	// PrefetchHits counts first uses of prefetched experts (a subset of
	// Hits).
	PrefetchHits uint64 `json:"prefetch_hits"`
	// WastedPrefetches counts prefetched experts evicted before any use.
	WastedPrefetches uint64 `json:"wasted_prefetches"`
	// PrefetchPrecision is PrefetchHits / PrefetchLoads (see Result).
	PrefetchPrecision float64 `json:"prefetch_precision"`
	// PrefetchRecall is PrefetchHits / (PrefetchHits + Misses) (see
	// Result).
	PrefetchRecall float64 `json:"prefetch_recall"`
	// RequestHitRates holds each request's hit rate, in replay order, when
	// ReplayConfig.PerRequest is set.
	RequestHitRates []float64 `json:"request_hit_rates,omitempty"`
}

// ratio returns a/b, or 0 when b is 0.
func ratio(a, b uint64) float64 {
	if b == 0 {
		return 0
	}
	return float64(a) / float64(b)
}

// withDefaults validates cfg against t and fills in defaults.
func (cfg ReplayConfig) withDefaults(t *Trace) (ReplayConfig, error) {
	var errs []error
	need := t.MaxGroup()
	if cfg.Slots < 1 || cfg.Slots < need {
		errs = append(errs, fmt.Errorf("sim: %d slots cannot hold one layer's %d experts; need at least max(1, %d)", cfg.Slots, need, need))
	}
	if cfg.Policy > cache.PolicyLFU {
		errs = append(errs, fmt.Errorf("sim: unknown cache policy %v", cfg.Policy))
	}
	if cfg.PrefetchPerLayer < 0 {
		errs = append(errs, fmt.Errorf("sim: prefetch per layer must be >= 0 (got %d)", cfg.PrefetchPerLayer))
	}
	if cfg.EAMCCapacity < 0 {
		errs = append(errs, fmt.Errorf("sim: EAMC capacity must be >= 0 (got %d)", cfg.EAMCCapacity))
	}
	if cfg.Matches < 0 {
		errs = append(errs, fmt.Errorf("sim: matches must be >= 0 (got %d)", cfg.Matches))
	}
	if math.IsNaN(cfg.PrefetchConfidence) || math.IsInf(cfg.PrefetchConfidence, 0) {
		errs = append(errs, fmt.Errorf("sim: prefetch confidence must be finite (got %v)", cfg.PrefetchConfidence))
	}
	if math.IsNaN(cfg.PrefetchMinEvidence) || math.IsInf(cfg.PrefetchMinEvidence, 0) {
		errs = append(errs, fmt.Errorf("sim: prefetch min evidence must be finite (got %v)", cfg.PrefetchMinEvidence))
	}
	if len(errs) > 0 {
		return cfg, errors.Join(errs...)
	}
	if cfg.PrefetchPerLayer == 0 {
		cfg.PrefetchPerLayer = max(need, 1)
	}
	if cfg.EAMCCapacity == 0 {
		cfg.EAMCCapacity = DefaultEAMCCapacity
	}
	if cfg.Matches == 0 {
		cfg.Matches = DefaultMatches
	}
	return cfg, nil
}

// Replay runs t through a fresh go/core decision core (cache, tracker, EAM
// collection, planner and the scorer built from them — the code go/engine
// runs every layer through) configured by cfg and returns the cache's
// counters. Loads complete instantly (there is no backend). It drives the
// core as go/engine decodes one request at a time:
//
//   - every request begins a tracker request and ends with core.End
//     (retiring its EAM into the collection, and clearing its prefetch
//     plan) after its last token;
//   - for each token, for each layer l in order, core.Layer: (a) the
//     token's routing (1 token per chosen expert) is observed and layer
//     l's priorities are refreshed; (b) the layer's distinct experts, in
//     ascending order as the engine takes them, are pinned together with
//     core.Pin (loads are completed at once) and unpinned — in Mapped mode
//     they are computed where they are and core.UseInPlace counts them and
//     decides the admissions of the misses (see access); (c) with
//     Prefetch, the planner (with Matches, PrefetchConfidence,
//     PrefetchMinEvidence and PrefetchMinTokenShare, as engine.Configure
//     sets them) plans over the request's partial EAM at layer l and the
//     plan replaces the request's previous one in the core's queue (and so
//     in the cache's predictions);
//   - then the engine's prefetch dispatcher runs (dispatch): the queue's
//     candidates are taken best first, each planned expert once while it
//     stays planned, and loaded when core.ReservePrefetch accepts them, up
//     to PrefetchPerLayer loads; the rest stay queued for the next layer;
//   - last, the layer's admissions (Mapped) complete: the engine's tracer
//     copies them after planning, so its dispatcher decides the layer's
//     prefetches while they are still being copied.
//
// Every decision is the core's, made in the engine's order, so a replay
// with a PrefetchPerLayer the queue never exceeds counts what the engine
// counts when each layer's copies complete before the next layer
// (go/engine's TestSimReplayAndEngineLayerCallsAgree checks both paths,
// every policy, prefetching on and off). What the engine adds is time:
// copies that are still in flight when a later layer needs their experts,
// a dispatcher that waits for on-demand copies, the prefetch window.
//
// Replay fails for an invalid trace or configuration.
func Replay(t *Trace, cfg ReplayConfig) (Result, error) {
	if err := t.Validate(); err != nil {
		return Result{}, err
	}
	cfg, err := cfg.withDefaults(t)
	if err != nil {
		return Result{}, err
	}
	L, E := t.Layers, t.Experts
	coll, err := trace.NewCollection(L, E, cfg.EAMCCapacity)
	if err != nil {
		return Result{}, fmt.Errorf("sim: %w", err)
	}
	cr, err := core.New(core.Config{
		Slots: cfg.Slots, Policy: cfg.Policy, Collection: coll, Matches: cfg.Matches,
		Confidence: cfg.PrefetchConfidence, MinEvidence: cfg.PrefetchMinEvidence, MinTokenShare: cfg.PrefetchMinTokenShare,
		Prefetch: cfg.Prefetch,
	})
	if err != nil {
		return Result{}, fmt.Errorf("sim: %w", err)
	}
	cr.Planner().SetTopK(t.MaxGroup()) // as the engine learns it from the routing
	c := cr.Cache()
	defer c.Close()

	counts := make([]float32, E)
	rows := [][]float32{counts}
	reqs := make([]uint64, 1)
	keys := make([]cache.Key, 0, t.MaxGroup())
	hits := make([]bool, 0, t.MaxGroup())
	var armed map[cache.Key]cache.Grant // fill-on-read reservations
	if cfg.FillOnRead {
		armed = map[cache.Key]cache.Grant{}
	}
	var perRequest []float64
	total := func() (hits, uses uint64) {
		var st cache.LayerStats
		for _, s := range c.Stats() {
			st.Add(s)
		}
		return st.Hits, st.Hits + st.Misses
	}
	for _, req := range t.Requests {
		h0, u0 := total()
		reqs[0] = cr.Begin()
		for _, tok := range req.Tokens {
			for l, group := range tok {
				for _, x := range group {
					counts[x] = 1
				}
				// In ascending expert order, as the engine pins a layer's
				// experts (its routing counts are per expert), so that
				// LRU/LFU ties break the same way in both.
				keys = keys[:0]
				for _, x := range group {
					keys = append(keys, cache.Key{Layer: int32(l), Expert: x})
				}
				slices.SortFunc(keys, func(a, b cache.Key) int { return cmp.Compare(a.Expert, b.Expert) })
				// On-demand access of the layer's experts, between the
				// core's observation and its planning.
				var admitted []cache.Grant
				use := func() error {
					switch {
					case len(keys) == 0:
					case cfg.Mapped:
						admitted = access(cr, keys, hits, cfg.AdmitMargin, armed)
					default:
						grants, err := cr.Pin(l, keys, nil)
						if err != nil {
							return err
						}
						for _, g := range grants {
							if g.Load {
								c.Complete(g.Slot, g.Gen, nil)
							}
						}
						c.Unpin(grants)
					}
					return nil
				}
				_, err := cr.Layer(l, reqs, rows, use)
				for _, x := range group {
					counts[x] = 0 // the tracker copied the row
				}
				if err != nil {
					return Result{}, fmt.Errorf("sim: %w", err)
				}
				if cfg.Prefetch {
					dispatch(cr, cfg.PrefetchPerLayer)
				}
				// The layer's admissions are copied after its plan's
				// prefetches are decided, as the engine's tracer copies
				// them after planning.
				for _, g := range admitted {
					if armed != nil {
						armed[g.Key] = g
					} else {
						c.Complete(g.Slot, g.Gen, nil)
					}
				}
			}
		}
		if err := cr.End(reqs[0]); err != nil {
			return Result{}, fmt.Errorf("sim: %w", err)
		}
		if cfg.PerRequest {
			h1, u1 := total()
			perRequest = append(perRequest, ratio(h1-h0, u1-u0))
		}
	}

	var st cache.LayerStats
	for _, s := range c.Stats() {
		st.Add(s)
	}
	link := st.Loads + st.PrefetchLoads
	if cfg.Mapped {
		link += st.Misses
		if cfg.FillOnRead {
			link -= st.Loads
		}
	}
	return Result{
		Label:             t.Label,
		Policy:            cfg.Policy.String(),
		Prefetch:          cfg.Prefetch,
		Slots:             cfg.Slots,
		Loads:             st.Loads,
		Evictions:         st.Evictions,
		LinkPerAccess:     ratio(link, st.Hits+st.Misses),
		Accesses:          st.Hits + st.Misses,
		Hits:              st.Hits,
		Misses:            st.Misses,
		HitRate:           ratio(st.Hits, st.Hits+st.Misses),
		PrefetchLoads:     st.PrefetchLoads,
		PrefetchHits:      st.PrefetchHits,
		WastedPrefetches:  st.WastedPrefetches,
		PrefetchPrecision: ratio(st.PrefetchHits, st.PrefetchLoads),
		PrefetchRecall:    ratio(st.PrefetchHits, st.PrefetchHits+st.Misses),
		RequestHitRates:   perRequest,
	}, nil
}

// dispatch is the engine's prefetch dispatcher with loads that complete at
// once: it takes the queue's candidates best first (core.TryTakePrefetch,
// each planned expert once while it stays planned) and loads each one
// core.ReservePrefetch accepts (a refused one is dropped, as the engine
// drops it), until n loads were made or nothing is queued. What is left
// stays queued for the next layer, as it would while the engine's
// dispatcher is busy.
func dispatch(cr *core.Core, n int) {
	c := cr.Cache()
	for n > 0 {
		cand, ok := cr.TryTakePrefetch()
		if !ok {
			return
		}
		g, ok := cr.ReservePrefetch(cand)
		if !ok {
			continue
		}
		c.Complete(g.Slot, g.Gen, nil)
		cr.PrefetchDone()
		n--
	}
}

// access is one mapped-mode layer's use: the experts are computed where
// they are (hits from their slots, misses in place) and core.UseInPlace
// counts the uses and decides the admissions, whose grants it returns (the
// caller completes them). With fill-on-read (armed holds the reserved
// grants), a computation that reads an armed expert in place, itself a
// miss, writes it into its reserved slot, which then becomes ready: that
// happens during the computation, before its admissions are decided.
func access(cr *core.Core, keys []cache.Key, hits []bool, margin float64, armed map[cache.Key]cache.Grant) []cache.Grant {
	c := cr.Cache()
	hits = hits[:0]
	for _, k := range keys {
		_, st := c.Lookup(k)
		hits = append(hits, st == cache.Ready)
	}
	for i, k := range keys {
		if g, ok := armed[k]; ok && !hits[i] { // this read fills the reserved slot
			delete(armed, k)
			c.Complete(g.Slot, g.Gen, nil)
		}
	}
	return cr.UseInPlace(keys, hits, margin, -1)
}
