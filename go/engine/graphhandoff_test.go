//go:build cgo

package engine

import (
	"math/rand/v2"
	"runtime"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/backend"
)

// noCopyHandOffGPU is a GPU stand-in with the eager hand-off but without
// copy mode's (its SetCopyHandOff is not backend.CopyHandOff's).
type noCopyHandOffGPU struct{ *handOffGPU }

func (noCopyHandOffGPU) SetCopyHandOff() {}

func TestGraphHandOffIsPlannedWhereHybridAndCopyModeServeIt(t *testing.T) {
	rates := &LinkRates{DMAGBps: 10, ZeroCopyGBps: 10, ReactionUs: 20}
	for _, tc := range []struct {
		name string
		cfg  Config
		wrap func(*backend.CPU) backend.Backend
		off  string // "": the graph hand-off is on
	}{
		{"hybrid on", Config{LinkRates: rates}, func(c *backend.CPU) backend.Backend { return &handOffGPU{CPU: c} }, ""},
		{"hybrid off: no link rates", Config{}, func(c *backend.CPU) backend.Backend { return &handOffGPU{CPU: c} }, "hybrid execution is off: the cuda backend's link rates are unknown"},
		{"hybrid off: cpu_experts off", Config{LinkRates: rates, CPUExperts: CPUExpertsOff}, func(c *backend.CPU) backend.Backend { return &handOffGPU{CPU: c} }, "hybrid execution is off: cpu_experts is off"},
		{"copy mode without the hand-off", Config{LinkRates: rates}, func(c *backend.CPU) backend.Backend { return noCopyHandOffGPU{&handOffGPU{CPU: c}} }, "copy mode cannot hand a captured layer to the CPU"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var p Plan
			if tc.cfg.CPUExperts == CPUExpertsOff {
				p = gpuEngineOff(t, tc.cfg, tc.wrap)
			} else {
				_, p = gpuEngine(t, tc.cfg, tc.wrap)
			}
			if tc.off != "" {
				assert.False(t, p.Executor.GraphHandOff)
				assert.Contains(t, p.Executor.GraphHandOffOff, tc.off)
				return
			}
			require.True(t, p.Executor.Hybrid, p.Executor.HybridOff)
			assert.True(t, p.Executor.GraphHandOff, p.Executor.GraphHandOffOff)
			assert.Empty(t, p.Executor.GraphHandOffOff)
		})
	}
}

// gpuEngineOff is gpuEngine with cpu_experts off.
func gpuEngineOff(t *testing.T, cfg Config, wrap func(*backend.CPU) backend.Backend) Plan {
	t.Helper()
	cfg.BudgetBytes, cfg.MaxSlots, cfg.CPUExperts = 4*4096, 4, CPUExpertsOff
	e, err := New(cfg)
	require.NoError(t, err)
	bf16Model(t, e, 2, 4)
	e.NewBackend = onCPUBackend(wrap)
	p, err := e.Configure(Setup{Layout: mixtralSpec, FFN: "swiglu"})
	require.NoError(t, err)
	t.Cleanup(func() { _ = e.Close() })
	return p
}

// graphStep warms L layers of T tokens up (mapped, eager), captures them
// in copy mode and returns their buffers.
func graphStep(t *testing.T, e *Engine, rng *rand.Rand, req uint64, L, E, T, K int) []*ffnIO {
	t.Helper()
	require.NoError(t, e.Tune(Tuning{GraphMisses: graphMissesPtr("copy")}))
	ios := make([]*ffnIO, L)
	for l := range L {
		ios[l] = ffnIOOf(rng, T, K, E, mH, mI, func() float32 { return 0.25 + rng.Float32() })
		require.NoError(t, e.LayerMapped(ios[l].call(l, T, K), []uint64{req}))
	}
	_, err := e.Stats() // the warm-up traced
	require.NoError(t, err)
	require.NoError(t, e.CaptureBegin())
	for l := range L {
		require.NoError(t, e.LayerMapped(ios[l].call(l, T, K), []uint64{req}))
	}
	n, err := e.CaptureEnd()
	require.NoError(t, err)
	require.Equal(t, L, n)
	return ios
}

// reroute gives a captured step new activations and routing, as the next
// token does: a replay reads them where the capture found them.
func reroute(rng *rand.Rand, io *ffnIO, T, K, E int) {
	next := ffnIOOf(rng, T, K, E, mH, mI, func() float32 { return 0.25 + rng.Float32() })
	copy(io.x, next.x)
	copy(io.topk, next.topk)
	copy(io.weights, next.weights)
	clear(io.out)
}

// A captured decode step replayed with the graph hand-off computes what
// the layers compute without hybrid execution (within the kernels'
// rounding: the CPU's part is summed apart), replay after replay, while
// the CPU computes some of the misses and the link brings the others; the
// CPU's experts are offered to the cache behind the replay.
func TestGraphHandOffReplaysMatchTheLayersWithoutHybrid(t *testing.T) {
	const L, E, T, K = 2, 4, 3, 2
	for _, tc := range []struct {
		name    string
		timeout time.Duration // the stand-in's CopyTimeout
	}{{"answered in time", time.Minute}, {"a late engine: every miss read in place", time.Nanosecond}} {
		t.Run(tc.name, func(t *testing.T) {
			e := hybridEngine(t, 4, func(e *Engine) { bf16Model(t, e, L, E) })
			p, err := e.Plan()
			require.NoError(t, err)
			require.True(t, p.Executor.GraphHandOff, p.Executor.GraphHandOffOff)
			e.be.(*backend.CPU).CopyTimeout = tc.timeout
			plain := mappedEngine(t, L, E, 4)
			rng := rand.New(rand.NewPCG(31, 32))
			req, err := e.BeginRequest()
			require.NoError(t, err)
			ios := graphStep(t, e, rng, req, L, E, T, K)
			require.NoError(t, e.ResetStats())
			used := 0 // distinct experts of the replayed layers
			for step := range 3 {
				want := make([][]byte, L)
				for l, io := range ios {
					reroute(rng, io, T, K, E)
					want[l] = reference(t, plain, io, l, T, K)
					used += distinctExperts(io.topk)
				}
				require.NoError(t, e.GraphStep(0, []uint64{req}))
				_, err := e.Stats() // the replay done and traced
				require.NoError(t, err)
				for l, io := range ios {
					assertBF16Close(t, want[l], io.out)
					assert.NotEqual(t, make([]byte, len(io.out)), io.out, "step %d, layer %d computed", step, l)
				}
			}
			st, err := e.Stats()
			require.NoError(t, err)
			if tc.timeout == time.Minute {
				assert.Positive(t, st.CPUComputed, "the CPU computed some misses")
				assert.Positive(t, st.Loads, "and the link brought others")
				assert.Zero(t, st.CopyLate)
			}
			assert.Equal(t, uint64(used), st.Hits+st.Misses, "each expert of each replayed layer counted once")
			require.NoError(t, e.EndRequest(req))
			runtime.KeepAlive(ios)
		})
	}
}

// The mailbox holds as many tokens as the warm-up's largest mapped call:
// a captured layer with more runs without the hand-off (copy mode as
// before), and is still right.
func TestGraphHandOffSkipsLayersLargerThanTheWarmUp(t *testing.T) {
	const L, E, T, K = 2, 4, 3, 2
	e := hybridEngine(t, 4, func(e *Engine) { bf16Model(t, e, L, E) })
	plain := mappedEngine(t, L, E, 4)
	rng := rand.New(rand.NewPCG(33, 34))
	req, err := e.BeginRequest()
	require.NoError(t, err)
	require.NoError(t, e.Tune(Tuning{GraphMisses: graphMissesPtr("copy")}))
	small := ffnIOOf(rng, 1, K, E, mH, mI, func() float32 { return 0.5 })
	require.NoError(t, e.LayerMapped(small.call(0, 1, K), []uint64{req})) // a warm-up of one token
	_, err = e.Stats()
	require.NoError(t, err)
	require.NoError(t, e.CaptureBegin())
	ios := make([]*ffnIO, L)
	for l := range L {
		ios[l] = ffnIOOf(rng, T, K, E, mH, mI, func() float32 { return 0.25 + rng.Float32() })
		require.NoError(t, e.LayerMapped(ios[l].call(l, T, K), []uint64{req}))
	}
	_, err = e.CaptureEnd()
	require.NoError(t, err)
	require.NoError(t, e.ResetStats())
	want := make([][]byte, L)
	for l, io := range ios {
		reroute(rng, io, T, K, E)
		want[l] = reference(t, plain, io, l, T, K)
	}
	require.NoError(t, e.GraphStep(0, []uint64{req}))
	st, err := e.Stats()
	require.NoError(t, err)
	for l, io := range ios {
		assert.Equal(t, want[l], io.out, "layer %d: every expert computed by the kernels", l)
	}
	assert.Zero(t, st.CPUComputed, "no layer had a mailbox")
	assert.Positive(t, st.Loads, "copy mode served the misses")
	require.NoError(t, e.EndRequest(req))
	runtime.KeepAlive(ios)
	runtime.KeepAlive(small)
}
