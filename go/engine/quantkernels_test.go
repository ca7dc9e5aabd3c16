package engine

import (
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/backend"
)

// qIO is one layer call's tensors at the quantized test model's sizes.
func qIO(rng *rand.Rand, T, K, E int) *ffnIO {
	return ffnIOOf(rng, T, K, E, qH, qI, func() float32 { return float32(rng.Float64()) })
}

// onViews computes io's layer with the CPU reference FFN over the experts
// as the host path sees them: dequantized into views by Acquire.
func onViews(t *testing.T, e *Engine, io *ffnIO, layer, T, K, E int) []byte {
	t.Helper()
	experts := make([]int32, E)
	for i := range experts {
		experts[i] = int32(i)
	}
	views := make([]int32, E)
	lease, err := e.Acquire(layer, experts, views, 0)
	require.NoError(t, err)
	defer func() { require.NoError(t, e.Release(lease, 0)) }()
	p, _ := e.Plan()
	gu, _ := p.Layout.Region("gate_up_proj")
	dn, _ := p.Layout.Region("down_proj")
	ref := &ffnIO{x: io.x, out: make([]byte, len(io.out)), scratch: make([]float32, len(io.scratch)), topk: io.topk, weights: io.weights}
	c := ref.call(layer, T, K)
	a := backend.FFNArgs{X: c.X, Out: c.Out, Scratch: c.Scratch, TopK: c.TopK, Weights: c.Weights, T: c.T, K: c.K,
		Hidden: qH, Inter: qI, GateUp: make([]uint64, E), Down: make([]uint64, E)}
	for i, v := range views {
		base, err := e.SlotAddr(int(v))
		require.NoError(t, err)
		a.GateUp[i], a.Down[i] = uint64(base)+uint64(gu.Offset), uint64(base)+uint64(dn.Offset)
	}
	require.NoError(t, backend.NewCPU(1).ReferenceFFN(a))
	return ref.out
}

func TestQuantizedFP8KernelsComputeFromTheSlotsWhatTheDequantizedViewsGive(t *testing.T) {
	const L, E, T, K = 2, 4, 3, 2
	e, p := newQuantEngine(t, Config{BudgetBytes: 1 << 20, Prefetch: noPrefetch(), ReferenceKernels: true}, L, E)
	ex := p.Executor
	assert.True(t, ex.Kernels, ex.KernelsOff)
	assert.Equal(t, "fp8", ex.Quant)
	assert.False(t, ex.Mapped, "mapped mode reads host rows without their scales: off for quantized experts")
	assert.False(t, ex.KernelsOnly, "the CPU has views for the caller's code")
	assert.Equal(t, [3]int64{0, qH, qI}, [3]int64{ex.DType, ex.Hidden, ex.Inter}, "the views' dtype and sizes")
	assert.Positive(t, p.Views.Count)

	rng := rand.New(rand.NewPCG(7, 8))
	req, err := e.BeginRequest()
	require.NoError(t, err)
	for layer := 0; layer < L; layer++ {
		io := qIO(rng, T, K, E)
		r, err := e.Layer(LayerArgs{FFNCall: io.call(layer, T, K), Reqs: []uint64{req}, TopKHost: io.topk})
		require.NoError(t, err)
		require.Equal(t, PathKernels, r.Path)
		want := onViews(t, e, io, layer, T, K, E)
		assert.Equal(t, want, io.out, "layer %d: the kernels on the FP8 slots give, bit for bit, the FFN of the dequantized experts", layer)
		assert.NotEqual(t, make([]byte, len(io.out)), io.out)
	}
	st, err := e.Stats()
	require.NoError(t, err)
	assert.Equal(t, int64(L*E)*p.SlotBytes, st.BytesMoved, "each expert crossed once, as stored (FP8 and its scales)")

	// Prefill-sized calls still go to the caller's code on the views.
	io := qIO(rng, 20, K, E)
	r, err := e.Layer(LayerArgs{FFNCall: io.call(0, 20, K), Reqs: []uint64{req}, TopKHost: io.topk})
	require.NoError(t, err)
	assert.Equal(t, PathHostStream, r.Path)
}

func TestQuantizedExecutorPlanSaysWhyTheKernelsAreOff(t *testing.T) {
	tests := []struct {
		name string
		cfg  Config
		ffn  string
		off  string
	}{
		{"CPU backend, reference kernels off", Config{}, "swiglu", "caller's code"},
		{"CPU SIMD kernels read bfloat16/float16 only", Config{CPUExperts: 1}, "swiglu", "quantized (fp8) and the cpu backend's kernels do not read that format"},
		{"not SwiGLU experts (gpt-oss)", Config{ReferenceKernels: true}, "", "not standard SwiGLU"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tc.cfg.BudgetBytes, tc.cfg.Prefetch = 1<<20, noPrefetch()
			e, err := New(tc.cfg)
			require.NoError(t, err)
			defer e.Close()
			quantModel(t, e, 1, 2)
			p, err := e.Configure(Setup{Layout: fp8Spec, FFN: tc.ffn})
			require.NoError(t, err)
			assert.False(t, p.Executor.Kernels)
			assert.Contains(t, p.Executor.KernelsOff, tc.off)
			assert.Empty(t, p.Executor.Quant)
		})
	}
	e, p := newQuantEngine(t, Config{BudgetBytes: 1 << 20, Prefetch: noPrefetch(), ReferenceKernels: true, CPUExperts: 1}, 1, 2)
	_ = e
	assert.True(t, p.Executor.Kernels, "the reference reads FP8 slots (SIMD calls fall back to it)")
	assert.False(t, p.Executor.Hybrid)
	assert.Contains(t, p.Executor.HybridOff, "quantized (fp8)")
}

// gpuQuantEngine configures the FP8 model on a stand-in GPU backend (the
// CPU backend reporting caps, backend name "cuda").
func gpuQuantEngine(t *testing.T, cfg Config, caps backend.Capabilities, L, E int) (*Engine, Plan, error) {
	t.Helper()
	cfg.Backend, cfg.BudgetBytes, cfg.Prefetch = "cuda", 1<<20, noPrefetch()
	e, err := New(cfg)
	require.NoError(t, err)
	t.Cleanup(func() { _ = e.Close() })
	e.NewBackend = func(cfg Config) (backend.Backend, error) { return gpuCaps{backend.NewCPU(cfg.Workers), caps}, nil }
	quantModel(t, e, L, E)
	p, err := e.Configure(Setup{Layout: fp8Spec, FFN: "swiglu"})
	return e, p, err
}

var gpuFP8Caps = backend.Capabilities{ExpertKernels: true, Mapped: true, MaxMappedPairs: 4096, QuantFormats: []string{"fp8"}}

func TestQuantizedExpertsOnAGPUNeedTheQuantizedKernelsOption(t *testing.T) {
	_, _, err := gpuQuantEngine(t, Config{}, gpuFP8Caps, 1, 2)
	require.ErrorIs(t, err, ErrUnsupported)
	assert.Contains(t, err.Error(), "opt-in while they run slower")
	assert.Contains(t, err.Error(), "quantized_kernels")

	_, _, err = gpuQuantEngine(t, Config{QuantizedKernels: true}, kernelCaps, 1, 2)
	require.ErrorIs(t, err, ErrUnsupported, "a GPU backend whose kernels do not read FP8 cannot serve it at all")
	assert.Contains(t, err.Error(), "computed by its expert kernels only")
	assert.Contains(t, err.Error(), "do not read that format")
}

func TestQuantizedExpertsOnAGPURunEveryLayerOnTheKernels(t *testing.T) {
	const L, E, K = 1, 4, 2
	e, p, err := gpuQuantEngine(t, Config{QuantizedKernels: true}, gpuFP8Caps, L, E)
	require.NoError(t, err)
	ex := p.Executor
	assert.True(t, ex.Kernels && ex.KernelsOnly, ex.KernelsOff)
	assert.False(t, ex.Mapped)
	assert.Zero(t, p.Views.Count, "no dequantized views: the whole budget is slots")
	assert.Nil(t, e.views)
	assert.Equal(t, min(int64(L*E), (1<<20)/p.SlotBytes), int64(p.Slots))

	// Oracle: the same model on the CPU, its views through the reference.
	oracle, _ := newQuantEngine(t, Config{BudgetBytes: 1 << 20, Prefetch: noPrefetch()}, L, E)
	rng := rand.New(rand.NewPCG(9, 10))
	for _, tc := range []struct {
		name  string
		T     int
		flags LayerFlags
	}{
		{"decode", 1, 0},
		{"prefill past the kernel crossover", 20, 0},
		{"the caller asked for its own code, which cannot run here", 2, LayerNoKernels | LayerNoMapped},
	} {
		io := qIO(rng, tc.T, K, E)
		a := LayerArgs{FFNCall: io.call(0, tc.T, K), Flags: tc.flags}
		r, err := e.Layer(a)
		require.NoError(t, err, tc.name)
		require.Equal(t, PathNeedRouting, r.Path, "%s: no mapped mode for quantized experts", tc.name)
		a.TopKHost = io.topk
		r, err = e.Layer(a)
		require.NoError(t, err, tc.name)
		require.Equal(t, PathKernels, r.Path, tc.name)
		assert.Equal(t, onViews(t, oracle, io, 0, tc.T, K, E), io.out, tc.name)
	}
}

func TestChoosePathKernelsOnly(t *testing.T) {
	only := ExecutorPlan{Kernels: true, KernelsOnly: true, DType: 0, Quant: "fp8"}
	tests := []struct {
		name string
		in   PathInputs
		want Path
	}{
		{"routing on the device", PathInputs{Exec: only, Tokens: 1, K: 2, WeightsOK: true}, PathNeedRouting},
		{"decode", PathInputs{Exec: only, Tokens: 1, K: 2, WeightsOK: true, HostRouting: true, Needed: 2, MaxPin: 4}, PathKernels},
		{"large prefill", PathInputs{Exec: only, Tokens: 512, K: 2, WeightsOK: true, HostRouting: true, Needed: 4, MaxPin: 4, ExpertBytes: 1 << 30}, PathKernels},
		{"caller asks for its code", PathInputs{Exec: only, Flags: LayerNoKernels | LayerHostBatched, Tokens: 1, K: 2, HostRouting: true, Needed: 2, MaxPin: 4}, PathKernels},
		{"more experts than slots: the kernels' acquire says so", PathInputs{Exec: only, Tokens: 8, K: 2, HostRouting: true, Needed: 9, MaxPin: 4}, PathKernels},
	}
	for _, tc := range tests {
		assert.Equal(t, tc.want, ChoosePath(tc.in), tc.name)
	}
}
