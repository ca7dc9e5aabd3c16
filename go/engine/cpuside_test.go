//go:build cgo

package engine

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/backend"
	"github.com/moe-infinity/moe_infinity/go/cache"
	"github.com/moe-infinity/moe_infinity/go/dtype"
)

// equalRates is an injected cost model: the link and the CPU equally
// fast, no contention, no fixed costs. With one hot miss on the link a
// cold one finishes sooner on the CPU (1 against 2 expert times).
var equalRates = HybridCosts{LinkGBps: 10, CPUGBps: 10, LinkShare: 1, CPUShare: 1}

// hybridEngine is the bf16 test model on the CPU backend with cpu_experts
// on, prefetching off (so that a predicted expert stays a miss) and the
// cost model injected; add registers the model (host tensors or a file).
func hybridEngine(t *testing.T, slots int, add func(*Engine)) *Engine {
	t.Helper()
	return hybridEngineWith(t, slots, equalRates, add)
}

// hybridEngineWith is hybridEngine with the cost model costs.
func hybridEngineWith(t *testing.T, slots int, costs HybridCosts, add func(*Engine)) *Engine {
	t.Helper()
	e, err := New(Config{BudgetBytes: int64(slots) * 4096, MaxSlots: slots, CPUExperts: 2, Prefetch: noPrefetch(), PrefetchMinEvidence: -1})
	require.NoError(t, err)
	add(e)
	e.MeasureHybrid = func(int64, int64, bool) (HybridCosts, error) { return costs, nil }
	p, err := e.Configure(Setup{Layout: mixtralSpec, FFN: "swiglu"})
	require.NoError(t, err)
	require.True(t, p.Executor.Hybrid, p.Executor.HybridOff)
	assert.Equal(t, costs, *p.Executor.HybridCosts)
	t.Cleanup(func() { _ = e.Close() })
	return e
}

// teachReuse stores one finished request in the EAMC that used expert 0
// at layer 0 and expert hot at layer 1, and starts a request that routes
// like it at layer 0: the EAMC then predicts hot for its layer 1.
func teachReuse(t *testing.T, e *Engine, hot int) uint64 {
	t.Helper()
	a, err := e.BeginRequest()
	require.NoError(t, err)
	row := func(x int) []float32 { r := make([]float32, 4); r[x] = 8; return r }
	require.NoError(t, e.Observe(0, []uint64{a}, [][]float32{row(0)}))
	require.NoError(t, e.Observe(1, []uint64{a}, [][]float32{row(hot)}))
	require.NoError(t, e.EndRequest(a))
	b, err := e.BeginRequest()
	require.NoError(t, err)
	require.NoError(t, e.Observe(0, []uint64{b}, [][]float32{row(0)}))
	return b
}

// hybridLayer runs layer 1 of req with tokens routed to experts (K = 1)
// and checks the output against the reference FFN on slots.
func hybridLayer(t *testing.T, e *Engine, req uint64, experts ...int64) {
	t.Helper()
	hybridLayerFlags(t, e, 1, 0, []uint64{req}, experts...)
}

// hybridLayerFlags is hybridLayer on layer with the call's flags and
// requests.
func hybridLayerFlags(t *testing.T, e *Engine, layer int, flags LayerFlags, reqs []uint64, experts ...int64) {
	t.Helper()
	const L, E = 2, 4
	T := len(experts)
	io := newFFNIO(rand.New(rand.NewPCG(7, uint64(T))), T, 1, E)
	copy(io.topk, experts)
	for i := range io.weights {
		io.weights[i] = 1
	}
	want := reference(t, mappedEngine(t, L, E, 4), io, layer, T, 1)
	a := LayerArgs{FFNCall: io.call(layer, T, 1), Reqs: reqs, TopKHost: io.topk, Flags: flags}
	a.WDType = dtype.F32
	r, err := e.Layer(a)
	require.NoError(t, err)
	assert.Equal(t, PathKernels, r.Path)
	assertBF16Close(t, want, io.out)
}

// A row-wise call (a stacked serve step: each token another request's
// row, to come out as it would alone) takes no CPU part on the kernels'
// path either, as on the host paths (hostHybridOK): which experts the CPU
// takes depends on the whole call, so a row's numbers would depend on its
// neighbours. Its misses are copied; the same call without the flag sends
// them to the CPU.
func TestHybridLeavesRowwiseCallsToTheDevice(t *testing.T) {
	fastCPU := HybridCosts{LinkGBps: 1, CPUGBps: 1000, LinkShare: 1, CPUShare: 1}
	e := hybridEngineWith(t, 4, fastCPU, func(e *Engine) { bf16Model(t, e, 2, 4) })
	a, err := e.BeginRequest()
	require.NoError(t, err)
	b, err := e.BeginRequest()
	require.NoError(t, err)
	require.NoError(t, e.ResetStats())
	hybridLayerFlags(t, e, 1, LayerRowwise, []uint64{a, b}, 2, 3)
	st, err := e.Stats()
	require.NoError(t, err)
	assert.Zero(t, st.CPUComputed, "a row-wise call's misses stay on the device")
	assert.Equal(t, uint64(2), st.Layers[1].Loads)

	require.NoError(t, e.ResetStats())
	hybridLayerFlags(t, e, 1, 0, []uint64{a, b}, 0, 1)
	st, err = e.Stats()
	require.NoError(t, err)
	assert.Equal(t, int64(2), st.Layers[1].CPUComputed, "without the flag the CPU takes them")
}

func TestHybridComputesAColdMissOnTheCPUWithoutAdmittingIt(t *testing.T) {
	// Without the prediction the lower id (cold) would cross the link and
	// hot go to the CPU (ties go to the link, fewest tokens then lowest id
	// first): the EAMC's prediction is what reverses them.
	const hot, cold = 3, 1
	e := hybridEngine(t, 2, func(e *Engine) { bf16Model(t, e, 2, 4) })
	// Fill both slots with layer 0's experts: any admission evicts.
	acquire(t, e, 0, 0, 2)
	req := teachReuse(t, e, hot)
	require.NoError(t, e.ResetStats())

	hybridLayer(t, e, req, hot, cold)

	st, err := e.Stats()
	require.NoError(t, err)
	l1 := st.Layers[1]
	assert.Equal(t, uint64(2), l1.Misses, "both are misses")
	assert.Equal(t, uint64(1), l1.Loads, "only the hot expert was loaded")
	assert.Equal(t, uint64(1), st.Evictions, "only the hot expert took a slot")
	assert.Equal(t, int64(1), l1.CPUComputed)
	assert.Positive(t, l1.CPUNs)
	assert.Equal(t, int64(1), st.CPUComputed, "totals")
	assert.Equal(t, l1.CPUNs, st.CPUNs)
	assert.Equal(t, int64(0), st.Layers[0].CPUComputed)
	assert.Equal(t, slotBytesOf(e), st.BytesMoved, "one expert crossed the link since the reset")
	_, st1 := e.cache.Lookup(cache.Key{Layer: 1, Expert: hot})
	_, st3 := e.cache.Lookup(cache.Key{Layer: 1, Expert: cold})
	assert.Equal(t, cache.Ready, st1, "the hot expert is admitted")
	assert.Equal(t, cache.Empty, st3, "the cold one is not")

	// Again: the hot one hits now; the cold one is computed on the CPU
	// once more (alone it ties with the link, and ties go to the link).
	hybridLayer(t, e, req, hot, cold)
	st, err = e.Stats()
	require.NoError(t, err)
	assert.Equal(t, uint64(1), st.Layers[1].Hits)
	assert.Equal(t, uint64(2), st.Layers[1].Loads, "alone, the cold miss ties and crosses the link")
	assert.Equal(t, int64(1), st.Layers[1].CPUComputed)

	require.NoError(t, e.ResetStats())
	st, err = e.Stats()
	require.NoError(t, err)
	assert.Zero(t, st.CPUComputed+st.CPUNs+st.Layers[1].CPUComputed+st.Layers[1].CPUNs)
}

func slotBytesOf(e *Engine) int64 { return e.lay.SlotBytes }

// waitAdmitted waits (up to 5 s) until no expert of layer is loading: the
// CPU's experts are admitted behind the call, and a flush skips a slot
// still loading.
func waitAdmitted(t *testing.T, e *Engine, layer int32) {
	t.Helper()
	require.Eventually(t, func() bool {
		for x := range int32(e.experts) {
			if _, st := e.cache.Lookup(cache.Key{Layer: layer, Expert: x}); st == cache.Loading {
				return false
			}
		}
		return true
	}, 5*time.Second, time.Millisecond, "layer %d's admissions done", layer)
}

// A CPU so much faster than the link that it takes every miss: the cache
// still learns the request's experts. Each expert the CPU computed is
// offered to the cache like an in-place read; one ranked above its victim
// is copied in behind the call, and the next calls hit it. Never admitting
// them left the slots holding whatever was there before, every call
// missing the same experts again.
func TestHybridCacheLearnsWhileTheCPUTakesEveryMiss(t *testing.T) {
	fastCPU := HybridCosts{LinkGBps: 1, CPUGBps: 1000, LinkShare: 1, CPUShare: 1}
	e := hybridEngineWith(t, 2, fastCPU, func(e *Engine) { bf16Model(t, e, 2, 4) })
	acquire(t, e, 0, 0, 1) // both slots hold layer 0's experts, used once
	req, err := e.BeginRequest()
	require.NoError(t, err)
	require.NoError(t, e.ResetStats())
	hybridLayer(t, e, req, 2, 3)
	st, err := e.Stats()
	require.NoError(t, err)
	assert.Equal(t, int64(2), st.Layers[1].CPUComputed, "the CPU took both misses")
	assert.Equal(t, uint64(2), st.Layers[1].Loads, "and both were admitted behind the call")
	waitResident(t, e, cache.Key{Layer: 1, Expert: 2})
	waitResident(t, e, cache.Key{Layer: 1, Expert: 3})

	for range 3 {
		hybridLayer(t, e, req, 2, 3)
	}
	st, err = e.Stats()
	require.NoError(t, err)
	assert.Equal(t, uint64(6), st.Layers[1].Hits, "every later call hits")
	assert.Equal(t, int64(2), st.Layers[1].CPUComputed, "and the CPU computes nothing more")
}

// The CPU's experts are admitted only as far as the backlog allows
// (admitBacklog windows waiting): a modelled link slow enough that one copy
// lasts the test (a slot at 1 kB/s) and a window of one, so admitBacklog
// may wait. The first call's four misses go to the CPU and are admitted
// (one copying, three waiting); of the second call's four (another layer)
// one is, filling the backlog; the third call admits none of its three
// (LRU, which would admit every one, so nothing but the bound holds them
// back), and no call waits for a copy.
func TestHybridBoundsTheCPUsAdmissionsBacklog(t *testing.T) {
	require.Equal(t, 4, admitBacklog, "the counts below assume it")
	slow := &LinkRates{DMAGBps: 1e-6, ZeroCopyGBps: 1e-6}
	e, err := New(Config{BudgetBytes: 8 * 4096, MaxSlots: 8, CPUExperts: 2, Prefetch: noPrefetch(), PrefetchMinEvidence: -1,
		Policy: "lru", PrefetchWindow: 1, LinkRates: slow, ModelLink: true})
	require.NoError(t, err)
	bf16Model(t, e, 2, 4)
	fastCPU := HybridCosts{LinkGBps: 1, CPUGBps: 1000, LinkShare: 1, CPUShare: 1}
	e.MeasureHybrid = func(int64, int64, bool) (HybridCosts, error) { return fastCPU, nil }
	_, err = e.Configure(Setup{Layout: mixtralSpec, FFN: "swiglu"})
	require.NoError(t, err)
	t.Cleanup(func() { _ = e.Close() })
	req, err := e.BeginRequest()
	require.NoError(t, err)
	reqs := []uint64{req}

	copyTime := time.Duration(float64(e.lay.SlotBytes) / slow.DMAGBps)
	start := time.Now()
	hybridLayerFlags(t, e, 1, 0, reqs, 0, 1, 2, 3)
	require.Eventually(t, func() bool { return e.admitWaiting.Load() == 3 }, time.Second, time.Millisecond, "one copying, three waiting")
	hybridLayerFlags(t, e, 0, 0, reqs, 0, 1, 2, 3)
	_, first := e.cache.Lookup(cache.Key{Layer: 0, Expert: 0})
	assert.Equal(t, cache.Loading, first, "the backlog's last place")
	hybridLayerFlags(t, e, 0, 0, reqs, 1, 2, 3)
	assert.Less(t, time.Since(start), copyTime, "no call waited for an admission's copy")
	st, err := e.Stats()
	require.NoError(t, err)
	assert.Equal(t, int64(4), st.Layers[1].CPUComputed)
	assert.Equal(t, int64(7), st.Layers[0].CPUComputed)
	assert.Equal(t, uint64(4+1), st.Layers[1].Loads+st.Layers[0].Loads, "the backlog's four and the window's one")
}

func TestHybridWithoutAPredictionSplitsTheMissesByCost(t *testing.T) {
	e := hybridEngine(t, 4, func(e *Engine) { bf16Model(t, e, 2, 4) })
	req, err := e.BeginRequest()
	require.NoError(t, err)
	// Four cold misses, equal rates: the link and the CPU take two each.
	hybridLayer(t, e, req, 0, 1, 2, 3)
	st, err := e.Stats()
	require.NoError(t, err)
	assert.Equal(t, int64(2), st.Layers[1].CPUComputed)
	assert.Equal(t, uint64(4), st.Layers[1].Loads, "two crossed the link for the call; the CPU's two were admitted into the empty slots after it")
	assert.Equal(t, uint64(4), st.Layers[1].Misses)
	// The cost model's expected time for the four: two experts' bytes on
	// each side at 10 GB/s, run together without contention or fixed costs.
	want := 2 * float64(e.lay.SourceBytes) / 10e9
	assert.InDelta(t, want*1e9, float64(st.Layers[1].MissPlanNs), 1)
	assert.Equal(t, st.Layers[1].MissPlanNs, st.MissPlanNs, "totals")
	assert.Zero(t, st.Layers[0].MissPlanNs)
	require.NoError(t, e.ResetStats())
	st, err = e.Stats()
	require.NoError(t, err)
	assert.Zero(t, st.MissPlanNs)
}

func TestHybridCalibratesTheCPUSideFromWhatItTook(t *testing.T) {
	// The injected probe claims a CPU four times faster than the link:
	// three of four cold misses go to it. The test model's experts are a
	// few KiB, so the CPU's real call takes far longer than the ~0.1 µs
	// the probe predicts: each call it is observed, Scale grows, and the
	// choice moves misses back to the link.
	fastCPU := HybridCosts{LinkGBps: 10, CPUGBps: 40, LinkShare: 1, CPUShare: 1}
	e := hybridEngineWith(t, 4, fastCPU, func(e *Engine) { bf16Model(t, e, 2, 4) })
	assert.Len(t, e.cpuMisses(1, []int32{0, 1, 2, 3}, 1, nil, []int64{0, 1, 2, 3}).experts, 3, "as the probe says")
	st, err := e.Stats()
	require.NoError(t, err)
	assert.Equal(t, 1.0, st.CPUScale)
	assert.Zero(t, st.CPUScaleCalls)

	req, err := e.BeginRequest()
	require.NoError(t, err)
	hybridLayer(t, e, req, 0, 1, 2, 3)
	st, err = e.Stats()
	require.NoError(t, err)
	assert.Equal(t, int64(3), st.Layers[1].CPUComputed)
	assert.Equal(t, int64(1), st.CPUScaleCalls, "the call was observed")
	for _, ph := range []string{"hand_out", "cpu_wait", "hand_back"} {
		assert.Contains(t, st.PhaseNs, ph)
	}
	assert.Positive(t, st.PhaseNs["hand_out"]+st.PhaseNs["cpu_wait"]+st.PhaseNs["hand_back"], "the hand-off's host time is accounted")
	assert.Greater(t, st.CPUScale, 1.1, "it took longer than the probe said")
	require.NoError(t, e.ResetStats())
	st, err = e.Stats()
	require.NoError(t, err)
	assert.Equal(t, int64(1), st.CPUScaleCalls, "model state, not a counter")

	// Calls observed twice as slow each time: the CPU's share shrinks
	// until the link takes every miss. Layer 1's experts are resident or
	// being admitted now (the link's one, and as many of the CPU's three as
	// the prefetch window had room for): three misses of layer 0 are asked
	// about instead.
	waitAdmitted(t, e, 1)
	three := func() cpuPick { return e.cpuMisses(0, []int32{1, 2, 3}, 1, nil, []int64{1, 2, 3}) }
	for len(three().experts) > 0 {
		require.Less(t, e.hybrid.cal.Calls(), int64(40), "the link takes the misses back")
		p := three()
		e.hybrid.cal.Observe(p.expectS, 2*p.expectS)
	}
	// The last of three misses leaves the CPU once one expert there
	// takes as long as all three on the link: 12 times the probe's 1/4.
	assert.GreaterOrEqual(t, e.hybrid.cal.Scale(), 12.0)
	assert.Less(t, e.hybrid.cal.Scale(), 12*math.Pow(2, calibrationStep), "and no further")
}

func TestHybridStagesExpertsOfMappedFiles(t *testing.T) {
	path := filepath.Join(t.TempDir(), "model.safetensors")
	writeBF16ModelFile(t, path, 2, 4)
	e := hybridEngine(t, 4, func(e *Engine) { require.NoError(t, e.AddCheckpoint(path)) })
	req, err := e.BeginRequest()
	require.NoError(t, err)
	hybridLayer(t, e, req, 0, 1, 2, 3)
	st, err := e.Stats()
	require.NoError(t, err)
	assert.Equal(t, int64(2), st.Layers[1].CPUComputed, "computed from staged copies, not from the file's pages")
	assert.Len(t, e.hybrid.stage, 2)
}

func TestMeasuredLinkRatesReachTheHybridCostModel(t *testing.T) {
	m := &linkMeter{rates: backend.LinkRates{DMAGBps: 50, ZeroCopyGBps: 40, ReactionUs: 20}}
	on := true
	_, p := meterEngine(t, m, Config{CPUExperts: 1, MeasureLink: &on}, Setup{Layout: mixtralSpec, FFN: "swiglu"})
	assert.Equal(t, LinkMeasured, p.LinkRatesSource)
	require.True(t, p.Executor.Hybrid, p.Executor.HybridOff)
	c := *p.Executor.HybridCosts
	assert.Equal(t, []float64{50, 40, 20}, []float64{c.LinkGBps, c.ReadGBps, c.LinkFixedUs}, "the device's link, as measured")
}

func TestHybridIsOffWhereItCannotRun(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  Config
		ffn  string
		off  string
	}{
		{"cpu_experts off", Config{CPUExperts: CPUExpertsOff}, "swiglu", "cpu_experts is off"},
		{"auto on the CPU backend", Config{}, "swiglu", `"auto" is off on the CPU backend`},
		{"not SwiGLU", Config{CPUExperts: 1}, "none", "not standard SwiGLU"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.cfg.BudgetBytes, tc.cfg.MaxSlots = 4*4096, 4
			e, err := New(tc.cfg)
			require.NoError(t, err)
			bf16Model(t, e, 2, 4)
			p, err := e.Configure(Setup{Layout: mixtralSpec, FFN: tc.ffn})
			require.NoError(t, err)
			t.Cleanup(func() { _ = e.Close() })
			assert.False(t, p.Executor.Hybrid)
			assert.Nil(t, p.Executor.HybridCosts)
			assert.Contains(t, p.Executor.HybridOff, tc.off)
		})
	}
}

func TestHybridCostsAreMeasuredAndLinkRatesReplaceTheLink(t *testing.T) {
	e, err := New(Config{BudgetBytes: 4 * 4096, MaxSlots: 4, CPUExperts: 1,
		LinkRates: &LinkRates{DMAGBps: 50, ZeroCopyGBps: 40, ReactionUs: 20}})
	require.NoError(t, err)
	bf16Model(t, e, 2, 4)
	p, err := e.Configure(Setup{Layout: mixtralSpec, FFN: "swiglu"})
	require.NoError(t, err)
	t.Cleanup(func() { _ = e.Close() })
	require.True(t, p.Executor.Hybrid, p.Executor.HybridOff)
	c := *p.Executor.HybridCosts
	assert.Positive(t, c.CPUGBps, "measured with cpuffn")
	assert.GreaterOrEqual(t, c.CPUTokenCost, 0.0)
	assert.True(t, c.LinkShare > 0 && c.LinkShare <= 1 && c.CPUShare > 0 && c.CPUShare <= 1, "%+v", c)
	assert.Equal(t, []float64{50, 40, 20}, []float64{c.LinkGBps, c.ReadGBps, c.LinkFixedUs}, "the device's link, as given")
}

// writeBF16ModelFile writes bf16Model's tensors (the same values) as one
// bfloat16 safetensors file.
func writeBF16ModelFile(t *testing.T, path string, L, E int) {
	t.Helper()
	type entry struct {
		DType   string   `json:"dtype"`
		Shape   []int64  `json:"shape"`
		Offsets [2]int64 `json:"data_offsets"`
	}
	hdr := map[string]entry{}
	var data []byte
	eachBF16Tensor(L, E, func(name string, shape []int64, b []byte) {
		begin := int64(len(data))
		data = append(data, b...)
		hdr[name] = entry{"BF16", shape, [2]int64{begin, int64(len(data))}}
	})
	h, err := json.Marshal(hdr)
	require.NoError(t, err)
	out := binary.LittleEndian.AppendUint64(nil, uint64(len(h)))
	require.NoError(t, os.WriteFile(path, append(append(out, h...), data...), 0o644))
}

// handOffGPU stands in for a GPU backend on the CPU backend: named "cuda",
// it counts the hand-off's calls and the bytes it hands out, and estimates
// the hand-off's fixed cost as the CUDA backend does.
type handOffGPU struct {
	*backend.CPU
	outs, backs, dones atomic.Int32
	sizes              [3]int64 // the last HandOut's x, weights and partial bytes
}

func (g *handOffGPU) Name() string { return "cuda" }

func (g *handOffGPU) HandOut(s uintptr, x uint64, xb int64, w uint64, wb int64, pb int64) (backend.HostWork, error) {
	g.outs.Add(1)
	g.sizes = [3]int64{xb, wb, pb}
	return g.CPU.HandOut(s, x, xb, w, wb, pb)
}

func (g *handOffGPU) HandBack(s uintptr, into uint64) (uint64, error) {
	g.backs.Add(1)
	return g.CPU.HandBack(s, into)
}
func (g *handOffGPU) HandDone(s uintptr) error { g.dones.Add(1); return g.CPU.HandDone(s) }
func (g *handOffGPU) HandOffFixedUs(r backend.LinkRates) float64 {
	return 2 * r.ReactionUs
}

// noHandOffGPU is a GPU stand-in without the hand-off (its HandOut is not
// backend.HandOff's).
type noHandOffGPU struct{ *backend.CPU }

func (noHandOffGPU) Name() string { return "cuda" }
func (noHandOffGPU) HandOut()     {}

// gpuEngine is hybridEngine's model and settings on a GPU stand-in made
// by wrap from the CPU backend, with cfg's link settings.
func gpuEngine(t *testing.T, cfg Config, wrap func(*backend.CPU) backend.Backend) (*Engine, Plan) {
	t.Helper()
	cfg.BudgetBytes, cfg.MaxSlots, cfg.CPUExperts = 4*4096, 4, 2
	cfg.Prefetch, cfg.PrefetchMinEvidence = noPrefetch(), -1
	e, err := New(cfg)
	require.NoError(t, err)
	bf16Model(t, e, 2, 4)
	e.NewBackend = onCPUBackend(wrap)
	e.MeasureHybrid = func(int64, int64, bool) (HybridCosts, error) { return equalRates, nil }
	p, err := e.Configure(Setup{Layout: mixtralSpec, FFN: "swiglu"})
	require.NoError(t, err)
	t.Cleanup(func() { _ = e.Close() })
	return e, p
}

func TestHybridOnADeviceBackendNeedsLinkRatesAndAHandOff(t *testing.T) {
	on := true
	measured := backend.LinkRates{DMAGBps: 50, ZeroCopyGBps: 40, ReactionUs: 20}
	for _, tc := range []struct {
		name string
		cfg  Config
		wrap func(*backend.CPU) backend.Backend
		off  string // "": hybrid is on
	}{
		{"no link rates", Config{}, func(c *backend.CPU) backend.Backend { return &handOffGPU{CPU: c} }, "link rates are unknown"},
		{"measure_link on, but no meter", Config{MeasureLink: &on}, func(c *backend.CPU) backend.Backend { return &handOffGPU{CPU: c} }, "link rates are unknown"},
		{"no hand-off", Config{LinkRates: &LinkRates{DMAGBps: 50, ZeroCopyGBps: 40, ReactionUs: 20}}, func(c *backend.CPU) backend.Backend { return noHandOffGPU{c} }, "cannot hand a layer to the CPU"},
		{"given rates", Config{LinkRates: &LinkRates{DMAGBps: 50, ZeroCopyGBps: 40, ReactionUs: 20}}, func(c *backend.CPU) backend.Backend { return &handOffGPU{CPU: c} }, ""},
		{"measured rates", Config{MeasureLink: &on}, func(c *backend.CPU) backend.Backend {
			return &meteredHandOffGPU{handOffGPU: &handOffGPU{CPU: c}, rates: measured}
		}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, p := gpuEngine(t, tc.cfg, tc.wrap)
			assert.Equal(t, "cuda", p.Backend)
			if tc.off != "" {
				assert.False(t, p.Executor.Hybrid)
				assert.Nil(t, p.Executor.HybridCosts)
				assert.Contains(t, p.Executor.HybridOff, tc.off)
				return
			}
			require.True(t, p.Executor.Hybrid, p.Executor.HybridOff)
			c := *p.Executor.HybridCosts
			assert.Equal(t, []float64{50, 40, 20}, []float64{c.LinkGBps, c.ReadGBps, c.LinkFixedUs}, "the device's link")
			assert.Equal(t, 40.0, c.HandOffFixedUs, "the backend's estimate of the hand-off from the link's rates")
			assert.Equal(t, equalRates.CPUGBps, c.CPUGBps, "the CPU's figures, as measured")
		})
	}
}

// meteredHandOffGPU is handOffGPU with a link to measure.
type meteredHandOffGPU struct {
	*handOffGPU
	rates backend.LinkRates
}

func (m *meteredHandOffGPU) MeasureLink() (backend.LinkRates, error) { return m.rates, nil }

// On a device backend the layer goes through the backend's hand-off: the
// activations and weights out, the CPU's float32 partial back, once per
// layer call, and the result is the layer's.
func TestHybridHandsTheLayerToTheCPUThroughTheBackend(t *testing.T) {
	var g *handOffGPU
	e, p := gpuEngine(t, Config{LinkRates: &LinkRates{DMAGBps: 10, ZeroCopyGBps: 10}}, func(c *backend.CPU) backend.Backend {
		g = &handOffGPU{CPU: c}
		return g
	})
	require.True(t, p.Executor.Hybrid, p.Executor.HybridOff)
	req, err := e.BeginRequest()
	require.NoError(t, err)
	hybridLayer(t, e, req, 0, 1, 2, 3)
	st, err := e.Stats()
	require.NoError(t, err)
	assert.Equal(t, int64(2), st.Layers[1].CPUComputed, "equal rates: the link and the CPU take two each")
	assert.Equal(t, []int32{1, 1, 1}, []int32{g.outs.Load(), g.backs.Load(), g.dones.Load()})
	const T = 4
	assert.Equal(t, [3]int64{T * mH * 2, T * 4, T * mH * 4}, g.sizes, "bfloat16 x, float32 weights, float32 partial")

	// A call without CPU experts does not hand anything over.
	hybridLayer(t, e, req, 0)
	assert.Equal(t, int32(1), g.outs.Load())
}

// Hybrid execution computes what the layer computes without it, within
// the kernels' rounding (the CPU's part is summed apart from the device's
// and added before the one rounding per token), for several tokens with
// two experts each and every routing-weight type.
func TestHybridMatchesTheLayerWithoutHybrid(t *testing.T) {
	const L, E = 2, 4
	for _, tc := range []struct {
		T, K int
		wdt  dtype.DType
	}{
		{1, 2, dtype.F32}, {3, 2, dtype.BF16}, {8, 2, dtype.F16}, {5, 3, dtype.F32},
	} {
		t.Run(fmt.Sprintf("T%d_K%d_w%s", tc.T, tc.K, tc.wdt), func(t *testing.T) {
			e := hybridEngine(t, 4, func(e *Engine) { bf16Model(t, e, L, E) })
			plain := mappedEngine(t, L, E, 4)
			req, err := e.BeginRequest()
			require.NoError(t, err)
			rng := rand.New(rand.NewPCG(uint64(tc.T), 9))
			io := ffnIOOf(rng, tc.T, tc.K, E, mH, mI, func() float32 { return 0.25 + rng.Float32() })
			weights := routingBytes(io.weights, tc.wdt)

			ref := &ffnIO{x: io.x, out: make([]byte, len(io.out)), scratch: make([]float32, len(io.scratch)), topk: io.topk, weights: io.weights}
			c := ref.call(1, tc.T, tc.K)
			c.Weights, c.WDType = addr(weights), tc.wdt
			seen := map[int64]bool{}
			for _, x := range io.topk {
				if !seen[x] {
					seen[x] = true
					c.Experts = append(c.Experts, int32(x))
				}
			}
			require.NoError(t, plain.LayerFFN(c))

			a := LayerArgs{FFNCall: io.call(1, tc.T, tc.K), Reqs: []uint64{req}, TopKHost: io.topk}
			a.Weights, a.WDType = addr(weights), tc.wdt
			r, err := e.Layer(a)
			require.NoError(t, err)
			assert.Equal(t, PathKernels, r.Path)
			st, err := e.Stats()
			require.NoError(t, err)
			assert.Positive(t, st.Layers[1].CPUComputed, "the CPU computed some experts")
			assert.Positive(t, st.Layers[1].Loads, "and the link brought others")
			assertBF16Close(t, ref.out, io.out)
		})
	}
}

// routingBytes are weights as wdt.
func routingBytes(w []float32, wdt dtype.DType) []byte {
	var out []byte
	for _, v := range w {
		switch wdt {
		case dtype.BF16:
			out = binary.LittleEndian.AppendUint16(out, dtype.F32BitsToBF16(math.Float32bits(v)))
		case dtype.F16:
			out = binary.LittleEndian.AppendUint16(out, dtype.F32BitsToF16(math.Float32bits(v)))
		default:
			out = binary.LittleEndian.AppendUint32(out, math.Float32bits(v))
		}
	}
	return out
}

func TestTuneCPUExpertsPausesAndResumesHybrid(t *testing.T) {
	e := hybridEngine(t, 4, func(e *Engine) { bf16Model(t, e, 2, 4) })
	req, err := e.BeginRequest()
	require.NoError(t, err)
	tune := func(v CPUExperts) error { return e.Tune(Tuning{CPUExperts: &v}) }
	plan := func() ExecutorPlan {
		p, err := e.Plan()
		require.NoError(t, err)
		return p.Executor
	}
	graph, graphOff := plan().GraphHandOff, plan().GraphHandOffOff

	require.NoError(t, tune(CPUExpertsOff))
	p := plan()
	assert.False(t, p.Hybrid)
	assert.Contains(t, p.HybridOff, "paused by tune")
	assert.False(t, p.GraphHandOff)
	assert.Contains(t, p.GraphHandOffOff, "paused by tune")
	require.NoError(t, tune(CPUExpertsOff), "pausing twice keeps what configure planned")
	// Four cold misses: with hybrid on, two go to the CPU (the test
	// above); paused, all four cross the link.
	hybridLayer(t, e, req, 0, 1, 2, 3)
	st, err := e.Stats()
	require.NoError(t, err)
	assert.Zero(t, st.Layers[1].CPUComputed)
	assert.Equal(t, uint64(4), st.Layers[1].Loads)
	assert.Zero(t, st.MissPlanNs, "paused, the cost model plans nothing")

	require.NoError(t, tune(CPUExpertsAuto))
	p = plan()
	assert.True(t, p.Hybrid)
	assert.Equal(t, 2, p.CPUThreads, "auto on the CPU backend resumes the configured count")
	assert.Empty(t, p.HybridOff)
	assert.Equal(t, graph, p.GraphHandOff, "resume restores configure's graph hand-off")
	assert.Equal(t, graphOff, p.GraphHandOffOff)
	waitAdmitted(t, e, 1)
	require.NoError(t, e.Tune(Tuning{Flush: true, ResetStats: true}))
	hybridLayer(t, e, req, 0, 1, 2, 3)
	st, err = e.Stats()
	require.NoError(t, err)
	assert.Equal(t, int64(2), st.Layers[1].CPUComputed)
	require.Positive(t, st.CPUScaleCalls)

	// A thread count: the CPU side runs on it, measured again, its
	// calibration started over; paused, a count resumes it.
	require.NoError(t, tune(CPUExpertsOff))
	require.NoError(t, tune(1))
	p = plan()
	assert.True(t, p.Hybrid)
	assert.Equal(t, 1, p.CPUThreads)
	assert.Equal(t, graph, p.GraphHandOff)
	assert.Equal(t, 1, e.hybrid.k.(*simdCPU).one.Threads())
	st, err = e.Stats()
	require.NoError(t, err)
	assert.Zero(t, st.CPUScaleCalls, "the calibration starts over")
	assert.Equal(t, 1.0, st.CPUScale)
	waitAdmitted(t, e, 1)
	require.NoError(t, e.Tune(Tuning{Flush: true, ResetStats: true}))
	hybridLayer(t, e, req, 0, 1, 2, 3)
	st, err = e.Stats()
	require.NoError(t, err)
	assert.Equal(t, int64(2), st.Layers[1].CPUComputed, "the same choice on one thread (the injected costs)")

	// Figures the cost model cannot use change nothing.
	e.MeasureHybrid = func(int64, int64, bool) (HybridCosts, error) { return HybridCosts{}, nil }
	require.ErrorIs(t, tune(2), ErrInvalid)
	assert.Equal(t, 1, plan().CPUThreads)
	assert.Equal(t, 1, e.hybrid.k.(*simdCPU).one.Threads())
	require.ErrorIs(t, tune(CPUExperts(-3)), ErrInvalid)
}

func TestTuneCPUExpertsCannotResumeWhatConfigureDidNotSetUp(t *testing.T) {
	e, err := New(Config{BudgetBytes: 4 * 4096, MaxSlots: 4, CPUExperts: CPUExpertsOff})
	require.NoError(t, err)
	bf16Model(t, e, 2, 4)
	_, err = e.Configure(Setup{Layout: mixtralSpec, FFN: "swiglu"})
	require.NoError(t, err)
	t.Cleanup(func() { _ = e.Close() })
	for _, tc := range []struct {
		value string // as JSON
		err   string // "" for none
	}{
		{`"off"`, ""},
		{`"auto"`, "not set up at configure: cpu_experts is off"},
		{`4`, "cpu_experts 4: hybrid execution was not set up at configure: cpu_experts is off"},
		{`"Auto"`, "names are exact"},
		{`"4"`, "unknown CPU expert mode"},
		{`0`, "neither"},
		{`null`, "cpu_experts"},
		{`""`, "cpu_experts"},
	} {
		tu, err := ParseTuning([]byte(`{"cpu_experts": ` + tc.value + `}`))
		if err == nil {
			err = e.Tune(tu)
		}
		if tc.err == "" {
			assert.NoError(t, err, tc.value)
			continue
		}
		assert.ErrorIs(t, err, ErrInvalid, tc.value)
		assert.ErrorContains(t, err, tc.err, tc.value)
	}
}
