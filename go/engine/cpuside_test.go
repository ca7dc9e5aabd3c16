//go:build cgo

package engine

import (
	"encoding/binary"
	"encoding/json"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/backend"
	"github.com/moe-infinity/moe_infinity/go/cache"
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
	e, err := New(Config{BudgetBytes: int64(slots) * 4096, MaxSlots: slots, CPUExperts: 2, Prefetch: noPrefetch(), PrefetchMinEvidence: -1})
	require.NoError(t, err)
	add(e)
	e.MeasureHybrid = func(int64, int64, bool) (HybridCosts, error) { return equalRates, nil }
	p, err := e.Configure(Setup{Layout: mixtralSpec, FFN: "swiglu"})
	require.NoError(t, err)
	require.True(t, p.Executor.Hybrid, p.Executor.HybridOff)
	assert.Equal(t, equalRates, *p.Executor.HybridCosts)
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
	const L, E = 2, 4
	T := len(experts)
	io := newFFNIO(rand.New(rand.NewPCG(7, uint64(T))), T, 1, E)
	copy(io.topk, experts)
	for i := range io.weights {
		io.weights[i] = 1
	}
	want := reference(t, mappedEngine(t, L, E, 4), io, 1, T, 1)
	a := LayerArgs{FFNCall: io.call(1, T, 1), Reqs: []uint64{req}, TopKHost: io.topk}
	a.WDType = backend.WeightsF32
	r, err := e.Layer(a)
	require.NoError(t, err)
	assert.Equal(t, PathKernels, r.Path)
	assertBF16Close(t, want, io.out)
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

func TestHybridWithoutAPredictionSplitsTheMissesByCost(t *testing.T) {
	e := hybridEngine(t, 4, func(e *Engine) { bf16Model(t, e, 2, 4) })
	req, err := e.BeginRequest()
	require.NoError(t, err)
	// Four cold misses, equal rates: the link and the CPU take two each.
	hybridLayer(t, e, req, 0, 1, 2, 3)
	st, err := e.Stats()
	require.NoError(t, err)
	assert.Equal(t, int64(2), st.Layers[1].CPUComputed)
	assert.Equal(t, uint64(2), st.Layers[1].Loads)
	assert.Equal(t, uint64(4), st.Layers[1].Misses)
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
