package engine

import (
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/backend"
	"github.com/moe-infinity/moe_infinity/go/cache"
	"github.com/moe-infinity/moe_infinity/go/sim"
)

// replayThroughEngine runs tr one token at a time through the engine's
// layer executor (the kernels path on the CPU backend: observe, pin and
// load, compute, plan) and returns the cache's totals. With prefetch on it
// waits after each layer until the dispatcher has drained the queue, so
// that prefetches complete before the next layer as go/sim's do.
func replayThroughEngine(t *testing.T, tr *sim.Trace, slots int, policy string, prefetchOn bool) cache.LayerStats {
	t.Helper()
	e, _ := execEngine(t, backend.Capabilities{ExpertKernels: true}, "swiglu", tr.Layers, tr.Experts, slots, func(e *Engine) {
		e.cfg.Prefetch = &prefetchOn
		e.cfg.Policy = policy
		e.cfg.PrefetchMinEvidence = -1 // one-token requests are evidence enough here
	})
	rng := rand.New(rand.NewPCG(3, 4))
	for _, req := range tr.Requests {
		id, err := e.BeginRequest()
		require.NoError(t, err)
		for _, tok := range req.Tokens {
			for l, group := range tok {
				io := newFFNIO(rng, 1, len(group), tr.Experts)
				for j, x := range group {
					io.topk[j] = int64(x)
				}
				a := LayerArgs{FFNCall: io.call(l, 1, len(group)), Reqs: []uint64{id}, TopKHost: io.topk, Flags: LayerNoMapped}
				a.WDType = backend.WeightsF32
				r, err := e.Layer(a)
				require.NoError(t, err)
				require.Equal(t, PathKernels, r.Path)
				if prefetchOn {
					waitIdle(t, e)
				}
			}
		}
		require.NoError(t, e.EndRequest(id))
	}
	st, err := e.Stats()
	require.NoError(t, err)
	return st.LayerStats.LayerStats
}

// A replay through go/sim and the same routing through the engine's Layer
// calls drive one core (go/core), so they count the same hits, misses,
// loads and evictions. Prefetching is off: the sim issues each layer's
// plan synchronously (Replay's issue) while the engine's dispatcher drains
// its queue, popping each planned expert once — the two differ (see
// sim.Replay), though both plan through the core.
func TestSimReplayAndEngineLayerCallsAgree(t *testing.T) {
	tr, err := sim.Generate(sim.GenParams{Layers: 4, Experts: 8, TopK: 2, Requests: 6, TokensPerRequest: 5, Clusters: 2, Skew: 1, Seed: 7})
	require.NoError(t, err)
	for _, tc := range []struct {
		name     string
		policy   cache.Policy
		prefetch bool
		slots    int
	}{
		{"priority", cache.PolicyPriority, false, 6},
		{"lru", cache.PolicyLRU, false, 5},
		{"lfu", cache.PolicyLFU, false, 7},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// Prefetches per layer: as many as a plan can hold, as the
			// engine's dispatcher drains whole plans.
			want, err := sim.Replay(tr, sim.ReplayConfig{Slots: tc.slots, Policy: tc.policy, Prefetch: tc.prefetch, PrefetchPerLayer: tr.Layers * tr.Experts, PrefetchMinEvidence: -1})
			require.NoError(t, err)
			got := replayThroughEngine(t, tr, tc.slots, tc.policy.String(), tc.prefetch)
			assert.Equal(t, want.Accesses, got.Hits+got.Misses)
			assert.Equal(t, want.Hits, got.Hits, "hits")
			assert.Equal(t, want.Misses, got.Misses, "misses")
			assert.Equal(t, want.Loads, got.Loads, "loads")
			assert.Equal(t, want.Evictions, got.Evictions, "evictions")
			assert.Equal(t, want.PrefetchLoads, got.PrefetchLoads, "prefetch loads")
			assert.Equal(t, want.PrefetchHits, got.PrefetchHits, "prefetch hits")
			assert.Equal(t, want.WastedPrefetches, got.WastedPrefetches, "wasted prefetches")
			assert.Positive(t, got.Evictions, "the cache is too small for the trace")
		})
	}
}
