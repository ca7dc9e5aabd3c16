package engine

import (
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/backend"
	"github.com/moe-infinity/moe_infinity/go/dtype"
)

// qIO is one layer call's tensors at the quantized test model's sizes.
func qIO(rng *rand.Rand, T, K, E int) *ffnIO {
	return ffnIOOf(rng, T, K, E, qH, qI, func() float32 { return float32(rng.Float64()) })
}

// acquireAll acquires all E experts of layer (expert i in views[i]) and
// returns the release, which checks it succeeds.
func acquireAll(t *testing.T, e *Engine, layer, E int) ([]int32, func()) {
	t.Helper()
	experts := make([]int32, E)
	for i := range experts {
		experts[i] = int32(i)
	}
	views := make([]int32, E)
	lease, err := e.Acquire(layer, experts, views, 0)
	require.NoError(t, err)
	return views, func() { require.NoError(t, e.Release(lease, 0)) }
}

// onViews computes io's layer with the CPU reference FFN over the experts
// as the host path sees them: dequantized into views by Acquire.
func onViews(t *testing.T, e *Engine, io *ffnIO, layer, T, K, E int) []byte {
	t.Helper()
	views, release := acquireAll(t, e, layer, E)
	defer release()
	p, _ := e.Plan()
	gu, _ := p.Layout.Region("gate_up_proj")
	dn, _ := p.Layout.Region("down_proj")
	ref := &ffnIO{x: io.x, out: make([]byte, len(io.out)), scratch: make([]float32, len(io.scratch)), topk: io.topk, weights: io.weights}
	c := ref.call(layer, T, K)
	a := backend.FFNArgs{X: c.X, Out: c.Out, Scratch: c.Scratch, TopK: c.TopK, Weights: c.Weights, T: c.T, K: c.K,
		Hidden: qH, Inter: qI, DType: dtype.BF16, WDType: dtype.F32, GateUp: make([]uint64, E), Down: make([]uint64, E)}
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
	assert.True(t, ex.Mapped, "mapped mode reads FP8 experts and their scale grids in place")
	assert.Equal(t, dtype.BF16, ex.DType, "the views' dtype")
	assert.Equal(t, [2]int64{qH, qI}, [2]int64{ex.Hidden, ex.Inter}, "the views' sizes")
	assert.Positive(t, p.Views.Count)

	rng := rand.New(rand.NewPCG(7, 8))
	req, err := e.BeginRequest()
	require.NoError(t, err)
	for layer := 0; layer < L; layer++ {
		io := qIO(rng, T, K, E)
		r, err := e.Layer(LayerArgs{FFNCall: io.call(layer, T, K), Reqs: []uint64{req}, TopKHost: io.topk, Flags: LayerNoMapped})
		require.NoError(t, err)
		require.Equal(t, PathKernels, r.Path)
		want := onViews(t, e, io, layer, T, K, E)
		assert.Equal(t, want, io.out, "layer %d: the kernels on the FP8 slots give, bit for bit, the FFN of the dequantized experts", layer)
		assert.NotEqual(t, make([]byte, len(io.out)), io.out)
	}
	st, err := e.Stats()
	require.NoError(t, err)
	assert.Equal(t, int64(L*E)*p.SlotBytes, st.BytesMoved, "each expert crossed once, as stored (FP8 and its scales)")

	// Mapped mode over the same (now resident) experts.
	for layer := 0; layer < L; layer++ {
		io := qIO(rng, T, K, E)
		r, err := e.Layer(LayerArgs{FFNCall: io.call(layer, T, K), Reqs: []uint64{req}, TopKHost: io.topk})
		require.NoError(t, err)
		require.Equal(t, PathMapped, r.Path)
		assert.Equal(t, onViews(t, e, io, layer, T, K, E), io.out, "layer %d: mapped FP8 experts read from their slots", layer)
	}

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

func TestQuantizedExpertsOnAGPURunOnDequantizedViewsWithoutTheKernels(t *testing.T) {
	const L, E, T, K = 1, 4, 3, 2
	for _, tc := range []struct {
		name string
		cfg  Config
		caps backend.Capabilities
		off  string
	}{
		{"quantized_kernels false", Config{QuantizedKernels: &kernelsOff}, gpuFP8Caps, "quantized_kernels"},
		{"kernels that do not read FP8", Config{QuantizedKernels: &kernelsOn}, kernelCaps, "do not read that format"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e, p, err := gpuQuantEngine(t, tc.cfg, tc.caps, L, E)
			require.NoError(t, err)
			assert.False(t, p.Executor.Kernels)
			assert.Contains(t, p.Executor.KernelsOff, tc.off)
			assert.Equal(t, "fp8", p.Views.Dequant)
			require.Positive(t, p.Views.Count, "views in the backend's memory")

			// The caller's code runs on views the backend filled, equal to
			// the CPU backend's.
			oracle, op := newQuantEngine(t, Config{BudgetBytes: 1 << 20, Prefetch: noPrefetch()}, L, E)
			io := qIO(rand.New(rand.NewPCG(3, 4)), T, K, E)
			r, err := e.Layer(LayerArgs{FFNCall: io.call(0, T, K), TopKHost: io.topk})
			require.NoError(t, err)
			assert.Equal(t, PathHostStream, r.Path)
			for x := range E {
				slots := make([]int32, 1)
				lease, err := e.Acquire(0, []int32{int32(x)}, slots, 0)
				require.NoError(t, err)
				want := make([]int32, 1)
				wl, err := oracle.Acquire(0, []int32{int32(x)}, want, 0)
				require.NoError(t, err)
				assert.Equal(t, viewBytes(t, oracle, int(want[0]))[:op.Views.Bytes], viewBytes(t, e, int(slots[0]))[:p.Views.Bytes], "expert %d", x)
				require.NoError(t, e.Release(lease, 0))
				require.NoError(t, oracle.Release(wl, 0))
			}
		})
	}
}

func TestQuantizedKernelsOnAGPUTakeDecodeAndLeavePrefillToTheViews(t *testing.T) {
	const L, E, K = 1, 4, 2
	e, p, err := gpuQuantEngine(t, Config{QuantizedKernels: &kernelsOn}, gpuFP8Caps, L, E)
	require.NoError(t, err)
	ex := p.Executor
	assert.True(t, ex.Kernels, ex.KernelsOff)
	assert.True(t, ex.Mapped, "the GPU's FP8 kernels read experts in place too")
	require.Positive(t, p.Views.Count, "views for the caller's code (prefill)")

	// Oracle: the same model on the CPU, its views through the reference.
	oracle, _ := newQuantEngine(t, Config{BudgetBytes: 1 << 20, Prefetch: noPrefetch()}, L, E)
	rng := rand.New(rand.NewPCG(9, 10))
	for _, tc := range []struct {
		name  string
		T     int
		flags LayerFlags
		want  Path
	}{
		{"decode: mapped, the experts read in place", 1, 0, PathMapped},
		{"decode again: mapped, the misses admitted since read from slots", 1, 0, PathMapped},
		{"decode with mapped mode off", 1, LayerNoMapped, PathKernels},
		{"prefill past the kernel crossover: the caller's code on views", 20, 0, PathHostStream},
		{"the caller asked for its own code", 2, LayerNoKernels | LayerNoMapped, PathHostStream},
		{"the caller asked for its own code, mapped mode on", 1, LayerNoKernels, PathHostStream},
	} {
		io := qIO(rng, tc.T, K, E)
		a := LayerArgs{FFNCall: io.call(0, tc.T, K), Flags: tc.flags}
		r, err := e.Layer(a)
		require.NoError(t, err, tc.name)
		if tc.want == PathMapped {
			require.Equal(t, PathMapped, r.Path, tc.name)
			e.drainMapped()
		} else {
			require.Equal(t, PathNeedRouting, r.Path, tc.name)
			a.TopKHost = io.topk
			r, err = e.Layer(a)
			require.NoError(t, err, tc.name)
			require.Equal(t, tc.want, r.Path, tc.name)
		}
		if tc.want != PathHostStream {
			assert.Equal(t, onViews(t, oracle, io, 0, tc.T, K, E), io.out, tc.name)
		}
	}
	st, err := e.Stats()
	require.NoError(t, err)
	assert.Positive(t, st.Misses, "the first mapped call read its experts in place")
}

// A decode step of the FP8 model on the stand-in GPU backend, captured
// (the CPU backend's stand-in for a CUDA graph) and replayed: every layer
// runs mapped, reading each expert from its slot or in place from the
// checkpoint's FP8 tensors and scale grids, and matches the dequantized
// experts' FFN bit for bit; each replay is traced.
func TestQuantizedExpertsOnAGPUCaptureMappedSteps(t *testing.T) {
	const L, E, T, K = 2, 4, 1, 2
	e, _, err := gpuQuantEngine(t, Config{QuantizedKernels: &kernelsOn}, gpuFP8Caps, L, E)
	require.NoError(t, err)
	oracle, _ := newQuantEngine(t, Config{BudgetBytes: 1 << 20, Prefetch: noPrefetch()}, L, E)
	rng := rand.New(rand.NewPCG(11, 12))
	req, err := e.BeginRequest()
	require.NoError(t, err)
	ios := make([]*ffnIO, L)
	require.NoError(t, e.CaptureBegin())
	for l := range L {
		ios[l] = qIO(rng, T, K, E)
		r, err := e.Layer(LayerArgs{FFNCall: ios[l].call(l, T, K), Reqs: []uint64{req}})
		require.NoError(t, err)
		require.Equal(t, PathMapped, r.Path)
	}
	n, err := e.CaptureEnd()
	require.NoError(t, err)
	require.Equal(t, L, n)
	for l, io := range ios {
		assert.Equal(t, onViews(t, oracle, io, l, T, K, E), io.out, "captured layer %d", l)
	}
	for replay := 1; replay <= 2; replay++ {
		require.NoError(t, e.GraphStep(0, []uint64{req}))
		e.drainMapped()
		st, err := e.Stats()
		require.NoError(t, err)
		assert.Equal(t, uint64(replay*L*K), st.Hits+st.Misses, "replay %d traced every layer", replay)
	}
	require.NoError(t, e.EndRequest(req))
}

func TestChoosePathQuantized(t *testing.T) {
	only := ExecutorPlan{Kernels: true, DType: dtype.BF16, Quant: "fp8"}
	mapped := only
	mapped.Mapped, mapped.MaxMappedPairs = true, 8
	tests := []struct {
		name string
		in   PathInputs
		want Path
	}{
		{"routing on the device", PathInputs{Exec: only, DType: dtype.BF16, Tokens: 1, K: 2, WeightsOK: true}, PathNeedRouting},
		{"decode", PathInputs{Exec: only, DType: dtype.BF16, Tokens: 1, K: 2, WeightsOK: true, HostRouting: true, Needed: 2, MaxPin: 4}, PathKernels},
		{"large prefill: the caller's code on views", PathInputs{Exec: only, DType: dtype.BF16, Tokens: 512, K: 2, WeightsOK: true, HostRouting: true, Needed: 4, MaxPin: 4, ExpertBytes: 1 << 30}, PathHostStream},
		{"caller asks for its code", PathInputs{Exec: only, DType: dtype.BF16, Flags: LayerNoKernels | LayerHostBatched, Tokens: 1, K: 2, HostRouting: true, Needed: 2, MaxPin: 4}, PathHostStacked},
		{"more experts than views at once: streamed", PathInputs{Exec: only, DType: dtype.BF16, Tokens: 8, K: 2, WeightsOK: true, HostRouting: true, Needed: 9, MaxPin: 4}, PathHostStream},
		{"mapped: decode", PathInputs{Exec: mapped, DType: dtype.BF16, Tokens: 1, K: 2, WeightsOK: true}, PathMapped},
		{"mapped: decode with the routing on the host too", PathInputs{Exec: mapped, DType: dtype.BF16, Tokens: 1, K: 2, WeightsOK: true, HostRouting: true, Needed: 2, MaxPin: 4}, PathMapped},
		{"mapped: large prefill goes through slots", PathInputs{Exec: mapped, DType: dtype.BF16, Tokens: 512, K: 2, WeightsOK: true, ExpertBytes: 1 << 30}, PathNeedRouting},
		{"mapped: caller turned mapped mode off", PathInputs{Exec: mapped, DType: dtype.BF16, Flags: LayerNoMapped, Tokens: 1, K: 2, WeightsOK: true}, PathNeedRouting},
		{"mapped: failed to start", PathInputs{Exec: mapped, DType: dtype.BF16, MappedOff: true, Tokens: 1, K: 2, WeightsOK: true}, PathNeedRouting},
		{"mapped: more pairs than a mapped call takes", PathInputs{Exec: mapped, DType: dtype.BF16, Tokens: 8, K: 2, WeightsOK: true}, PathNeedRouting},
		{"mapped: routing weights the kernels do not read", PathInputs{Exec: mapped, DType: dtype.BF16, Tokens: 1, K: 2}, PathNeedRouting},
		{"mapped: activations of another dtype", PathInputs{Exec: mapped, Tokens: 1, K: 2, WeightsOK: true, DType: dtype.F16}, PathNeedRouting},
		{"mapped: routing gaps: the caller's code", PathInputs{Exec: mapped, DType: dtype.BF16, Flags: LayerRoutingGaps, Tokens: 1, K: 2, WeightsOK: true, HostRouting: true, Needed: 1, MaxPin: 4}, PathHostStream},
	}
	for _, tc := range tests {
		assert.Equal(t, tc.want, ChoosePath(tc.in), tc.name)
	}
}

// kernelsOn and kernelsOff are Config.QuantizedKernels given.
var kernelsOn, kernelsOff = true, false

func TestQuantizedKernelsDefaultToTheKernelsForFP8Only(t *testing.T) {
	for _, tc := range []struct {
		name        string
		set         *bool
		ffn, method string
		want        bool
	}{
		{"default: FP8 SwiGLU experts take the kernels", nil, "swiglu", "fp8", true},
		{"default: gpt-oss MXFP4 experts keep the caller's code", nil, "gpt_oss", "mxfp4", false},
		{"default: gpt-oss bfloat16 experts keep the caller's code", nil, "gpt_oss", "", false},
		{"false: FP8 on views", &kernelsOff, "swiglu", "fp8", false},
		{"true: gpt-oss on the kernels", &kernelsOn, "gpt_oss", "mxfp4", true},
	} {
		assert.Equal(t, tc.want, Config{QuantizedKernels: tc.set}.quantizedKernels(tc.ffn, tc.method), tc.name)
	}
	// And in the plan: an FP8 model on a GPU with the engine's defaults.
	_, p, err := gpuQuantEngine(t, Config{}, gpuFP8Caps, 1, 4)
	require.NoError(t, err)
	assert.True(t, p.Executor.Kernels, p.Executor.KernelsOff)
	assert.Equal(t, "fp8", p.Executor.Quant)
	assert.True(t, p.Executor.Mapped)
}

func TestQuantizedKernelsIsParsedStrictly(t *testing.T) {
	for _, tc := range []struct {
		json string
		want *bool
	}{
		{`{"budget_bytes": 1}`, nil},
		{`{"budget_bytes": 1, "quantized_kernels": null}`, nil},
		{`{"budget_bytes": 1, "quantized_kernels": true}`, &kernelsOn},
		{`{"budget_bytes": 1, "quantized_kernels": false}`, &kernelsOff},
	} {
		c, err := ParseConfig([]byte(tc.json))
		require.NoError(t, err, tc.json)
		assert.Equal(t, tc.want, c.QuantizedKernels, tc.json)
	}
	_, err := ParseConfig([]byte(`{"budget_bytes": 1, "quantized_kernels": "yes"}`))
	assert.ErrorIs(t, err, ErrInvalid)
}
