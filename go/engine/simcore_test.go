package engine

import (
	"math/rand/v2"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/backend"
	"github.com/moe-infinity/moe_infinity/go/cache"
	"github.com/moe-infinity/moe_infinity/go/dtype"
	"github.com/moe-infinity/moe_infinity/go/sim"
)

// heldBackend is the CPU backend standing in for a kernel backend with
// mapped mode, whose copies into slots take time: while a layer is held,
// its non-urgent loads (the tracer's admissions of that layer's misses;
// prefetches are planned for later layers only) start only when release
// is called. go/sim replays exactly that: a layer's admissions are still
// being copied while the prefetches its plan asks for are decided.
type heldBackend struct {
	gpuCaps
	mu    sync.Mutex
	layer int      // the held layer (-1: none)
	held  []func() // the held loads, started by release
}

// Load is the CPU backend's Load, held back for the held layer.
func (b *heldBackend) Load(slot, layer, expert int, urgent bool) backend.Transfer {
	b.mu.Lock()
	defer b.mu.Unlock()
	if urgent || layer != b.layer {
		return b.gpuCaps.Load(slot, layer, expert, urgent)
	}
	p := backend.NewPending()
	b.held = append(b.held, func() {
		tr := b.gpuCaps.Load(slot, layer, expert, urgent)
		go func() {
			err := tr.Err()
			<-tr.Finished()
			p.Finish(err)
		}()
	})
	return p
}

// hold holds layer's non-urgent loads until release.
func (b *heldBackend) hold(layer int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.layer = layer
}

// release starts the held loads and holds nothing more.
func (b *heldBackend) release() {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, f := range b.held {
		f()
	}
	b.held, b.layer = nil, -1
}

// engineRun is how replayThroughEngine drives the engine.
type engineRun struct {
	slots       int
	policy      cache.Policy
	prefetch    bool
	mapped      bool
	admitMargin float64
}

// replayThroughEngine runs tr one token at a time through the engine's
// layer executor and returns the cache's totals. Without mapped it takes
// the kernels path (observe, pin and load, compute, plan); with it the
// mapped path (compute reading experts where they are, then the tracer:
// observe, touch and admit, plan), each layer's admission copies held
// until the dispatcher has taken every planned expert. After each layer
// it waits until every copy has completed, as go/sim's complete at once.
func replayThroughEngine(t *testing.T, tr *sim.Trace, run engineRun) cache.LayerStats {
	t.Helper()
	caps := backend.Capabilities{ExpertKernels: true}
	flags := LayerNoMapped
	want := PathKernels
	if run.mapped {
		caps, flags, want = kernelCaps, 0, PathMapped
	}
	be := &heldBackend{layer: -1}
	e, _ := bf16Engine(t, Setup{Layout: mixtralSpec, FFN: "swiglu"}, tr.Layers, tr.Experts, run.slots, func(e *Engine) {
		e.cfg.Prefetch = &run.prefetch
		e.cfg.Policy = run.policy.String()
		e.cfg.PrefetchMinEvidence = -1 // one-token requests are evidence enough here
		e.cfg.AdmitMargin = &run.admitMargin
		// Room for a layer's held admissions and the prefetches after them.
		e.cfg.PrefetchWindow = tr.Layers * tr.Experts
		e.NewBackend = func(cfg Config) (backend.Backend, error) {
			be.gpuCaps = gpuCaps{backend.NewCPU(cfg.Workers), caps}
			return be, nil
		}
	})
	settled := func() bool { return e.PrefetchIdle() && len(e.prefSem) == 0 }
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
				a := LayerArgs{FFNCall: io.call(l, 1, len(group)), Reqs: []uint64{id}, TopKHost: io.topk, Flags: flags}
				a.WDType = dtype.F32
				be.hold(l)
				r, err := e.Layer(a)
				require.NoError(t, err)
				require.Equal(t, want, r.Path)
				e.drainMapped() // traced, admissions decided, planned
				waitIdle(t, e)  // every planned expert taken, and loaded or dropped
				be.release()    // the admissions' copies go ahead
				require.Eventually(t, settled, 5*time.Second, time.Millisecond)
				runtime.KeepAlive(io) // the call held its buffers by address only
			}
		}
		require.NoError(t, e.EndRequest(id))
	}
	st, err := e.Stats()
	require.NoError(t, err)
	return st.LayerStats.LayerStats
}

// A replay through go/sim and the same routing through the engine's Layer
// calls drive one core (go/core): the same observation, use and planning
// of every layer, the same admissions in mapped mode and the same prefetch
// dispatch (each planned expert taken once, best first), so they count the
// same hits, misses, loads, evictions and prefetches, on both the kernels
// and the mapped path, with prefetching off and on, under every policy.
func TestSimReplayAndEngineLayerCallsAgree(t *testing.T) {
	tr, err := sim.Generate(sim.GenParams{Layers: 4, Experts: 8, TopK: 2, Requests: 6, TokensPerRequest: 5, Clusters: 2, Skew: 1, Seed: 7})
	require.NoError(t, err)
	policies := []struct {
		policy cache.Policy
		slots  int
	}{
		{cache.PolicyPriority, 6},
		{cache.PolicyLRU, 5},
		{cache.PolicyLFU, 7},
	}
	modes := []struct {
		name        string
		mapped      bool
		admitMargin float64
	}{
		{"kernels", false, 0},
		{"mapped", true, 0},
		{"mapped-margin1", true, 1},
	}
	for _, mode := range modes {
		for _, pol := range policies {
			for _, prefetchOn := range []bool{false, true} {
				name := mode.name + "/" + pol.policy.String() + "/prefetch-off"
				if prefetchOn {
					name = mode.name + "/" + pol.policy.String() + "/prefetch-on"
				}
				t.Run(name, func(t *testing.T) {
					run := engineRun{slots: pol.slots, policy: pol.policy, prefetch: prefetchOn, mapped: mode.mapped, admitMargin: mode.admitMargin}
					// A dispatcher that keeps up: as many prefetches per
					// layer as the queue can hold.
					want, err := sim.Replay(tr, sim.ReplayConfig{
						Slots: run.slots, Policy: run.policy, Prefetch: run.prefetch,
						PrefetchPerLayer: tr.Layers * tr.Experts, PrefetchMinEvidence: -1,
						Mapped: run.mapped, AdmitMargin: run.admitMargin,
					})
					require.NoError(t, err)
					got := replayThroughEngine(t, tr, run)
					assert.Equal(t, want.Accesses, got.Hits+got.Misses)
					assert.Equal(t, want.Hits, got.Hits, "hits")
					assert.Equal(t, want.Misses, got.Misses, "misses")
					assert.Equal(t, want.Loads, got.Loads, "loads")
					assert.Equal(t, want.Evictions, got.Evictions, "evictions")
					assert.Equal(t, want.PrefetchLoads, got.PrefetchLoads, "prefetch loads")
					assert.Equal(t, want.PrefetchHits, got.PrefetchHits, "prefetch hits")
					assert.Equal(t, want.WastedPrefetches, got.WastedPrefetches, "wasted prefetches")
					// The trace exercises what is compared.
					assert.Positive(t, got.Evictions, "the cache is too small for the trace")
					assert.Positive(t, got.Loads, "loads (admissions in mapped mode)")
					if prefetchOn {
						assert.Positive(t, got.PrefetchLoads, "prefetches")
					} else {
						assert.Zero(t, got.PrefetchLoads)
					}
				})
			}
		}
	}
}
