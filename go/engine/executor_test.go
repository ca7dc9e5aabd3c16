package engine

import (
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/backend"
	"github.com/moe-infinity/moe_infinity/go/dtype"
)

// gpuLike is the executor's view of a kernel backend with mapped mode.
var gpuLike = ExecutorPlan{Kernels: true, Mapped: true, DType: dtype.BF16, MaxMappedPairs: 4096}

func TestChoosePath(t *testing.T) {
	decode := func(mod func(*PathInputs)) PathInputs {
		in := PathInputs{Exec: gpuLike, Tokens: 1, K: 2, ExpertBytes: 352 << 20, DType: dtype.BF16, WeightsOK: true, MaxPin: 8}
		if mod != nil {
			mod(&in)
		}
		return in
	}
	withRouting := func(needed int) func(*PathInputs) {
		return func(in *PathInputs) { in.HostRouting, in.Needed = true, needed }
	}
	for _, tc := range []struct {
		name string
		in   PathInputs
		want Path
	}{
		{"decode on a mapped backend", decode(nil), PathMapped},
		{"fine-grained experts, 16 tokens: still the kernels", decode(func(in *PathInputs) { in.Tokens, in.ExpertBytes = 16, 9<<20 }), PathMapped},
		{"big experts, 4 tokens: torch wins, routing needed", decode(func(in *PathInputs) { in.Tokens = 4 }), PathNeedRouting},
		{"big experts, 4 tokens, routing given: caller's code, streamed", decode(func(in *PathInputs) { in.Tokens = 4; withRouting(3)(in) }), PathHostStream},
		{"17 tokens: past the kernel crossover", decode(func(in *PathInputs) { in.Tokens, in.ExpertBytes = 17, 1<<20; withRouting(3)(in) }), PathHostStream},
		{"big experts, 4 requests' rows: as one token each, the kernels", decode(func(in *PathInputs) { in.Tokens, in.Flags = 4, LayerRowwise }), PathMapped},
		{"32 rows of fine-grained experts: still the kernels", decode(func(in *PathInputs) {
			in.Tokens, in.ExpertBytes, in.Flags = 32, 1<<20, LayerRowwise
			withRouting(3)(in)
		}), PathMapped},
		{"rows without mapped mode: kernels after routing", decode(func(in *PathInputs) { in.Tokens, in.Flags = 4, LayerRowwise|LayerNoMapped; withRouting(3)(in) }), PathKernels},
		{"rows on the CPU backend: the caller's code (per row in the caller)", decode(func(in *PathInputs) {
			in.Exec.Kernels = false
			in.Tokens, in.Flags = 4, LayerRowwise
			withRouting(3)(in)
		}), PathHostStream},
		{"more pairs than the mapped buffers: kernels after routing", decode(func(in *PathInputs) { in.K = 4097 }), PathNeedRouting},
		{"more pairs than the mapped buffers, routing given", decode(func(in *PathInputs) { in.K = 4097; withRouting(4)(in) }), PathKernels},
		{"mapped off by the caller", decode(func(in *PathInputs) { in.Flags = LayerNoMapped }), PathNeedRouting},
		{"mapped off by the caller, routing given", decode(func(in *PathInputs) { in.Flags = LayerNoMapped; withRouting(2)(in) }), PathKernels},
		{"mapped failed to start", decode(func(in *PathInputs) { in.MappedOff = true; withRouting(2)(in) }), PathKernels},
		{"backend without mapped mode", decode(func(in *PathInputs) { in.Exec.Mapped = false; withRouting(2)(in) }), PathKernels},
		{"more experts than slots: streamed through them", decode(func(in *PathInputs) { in.Flags = LayerNoMapped; withRouting(9)(in) }), PathHostStream},
		{"activations of another dtype", decode(func(in *PathInputs) { in.DType = dtype.Invalid; withRouting(2)(in) }), PathHostStream},
		{"routing weights the kernels cannot read", decode(func(in *PathInputs) { in.WeightsOK = false; withRouting(2)(in) }), PathHostStream},
		{"caller asked for no kernels", decode(func(in *PathInputs) { in.Flags = LayerNoKernels; withRouting(2)(in) }), PathHostStream},
		{"no kernels, batched caller code", decode(func(in *PathInputs) { in.Flags = LayerNoKernels | LayerHostBatched; withRouting(2)(in) }), PathHostStacked},
		{"kernels on, batched caller code, many tokens: streamed, not stacked", decode(func(in *PathInputs) {
			in.Flags, in.Tokens = LayerHostBatched, 64
			withRouting(8)(in)
		}), PathHostStream},
		{"routing with gaps: the caller's code", decode(func(in *PathInputs) { in.Flags = LayerRoutingGaps; withRouting(2)(in) }), PathHostStream},
		{"routing with gaps, no host copy yet: asked for", decode(func(in *PathInputs) { in.Flags = LayerRoutingGaps }), PathNeedRouting},
		{"CPU backend", PathInputs{Exec: ExecutorPlan{DType: dtype.Invalid}, Tokens: 1, K: 2, DType: dtype.Invalid, WeightsOK: true, HostRouting: true, Needed: 2, MaxPin: 1}, PathHostStream},
		{"CPU backend, batched caller code", PathInputs{Exec: ExecutorPlan{DType: dtype.Invalid}, Tokens: 5, K: 2, Flags: LayerHostBatched, DType: dtype.Invalid, HostRouting: true, Needed: 2, MaxPin: 4}, PathHostStacked},
		{"CPU backend, routing on the device only", PathInputs{Exec: ExecutorPlan{DType: dtype.Invalid}, Tokens: 1, K: 2, DType: dtype.Invalid}, PathNeedRouting},
	} {
		t.Run(tc.name, func(t *testing.T) {
			assert.Equal(t, tc.want, ChoosePath(tc.in), "%+v", tc.in)
		})
	}
}

func TestKernelWinsIsTheMeasuredCrossover(t *testing.T) {
	for _, tc := range []struct {
		tokens, bytes int64
		want          bool
	}{
		{1, 1 << 30, true}, {2, 352 << 20, false}, {2, KernelSmallExpertBytes, true},
		{KernelMaxTokens, 9 << 20, true}, {KernelMaxTokens + 1, 9 << 20, false},
	} {
		assert.Equal(t, tc.want, KernelWins(tc.tokens, tc.bytes), "%d tokens, %d bytes", tc.tokens, tc.bytes)
	}
}

func TestAMeasuredKernelCrossoverReplacesTheDefault(t *testing.T) {
	e, p := execEngine(t, kernelCaps, "swiglu", 1, 4, 2)
	require.Equal(t, CrossoverDefault, p.Executor.KernelCrossover)
	path := func(tokens int64) Path {
		e.mu.Lock()
		ex := e.plan.Executor
		e.mu.Unlock()
		return ChoosePath(PathInputs{Exec: ex, Tokens: tokens, K: 2, DType: dtype.BF16, WeightsOK: true, HostRouting: true,
			ExpertBytes: 352 << 20, Needed: 2, MaxPin: 2, Flags: LayerNoMapped})
	}
	tune := func(n int64) error { return e.Tune(Tuning{KernelMaxTokens: &n}) }
	assert.Equal(t, PathHostStream, path(2), "by default Mixtral-sized experts take one token on the kernels")

	require.NoError(t, tune(4))
	p, err := e.Plan()
	require.NoError(t, err)
	assert.Equal(t, CrossoverMeasured, p.Executor.KernelCrossover)
	assert.Equal(t, int64(4), p.Executor.KernelMaxTokens)
	assert.Equal(t, e.lay.SourceBytes, p.Executor.KernelSmallExpertBytes, "measured on this model's experts")
	assert.Equal(t, PathKernels, path(4), "measured: up to 4 tokens whatever the experts' size")
	assert.Equal(t, PathHostStream, path(5))
	assert.Equal(t, PathKernels, path(1))

	require.NoError(t, tune(1))
	assert.Equal(t, PathKernels, path(1), "one token always")
	assert.Equal(t, PathHostStream, path(2))

	require.NoError(t, tune(0))
	p, err = e.Plan()
	require.NoError(t, err)
	assert.Equal(t, CrossoverDefault, p.Executor.KernelCrossover, "0 goes back to the default")
	assert.Equal(t, []int64{KernelMaxTokens, KernelSmallExpertBytes}, []int64{p.Executor.KernelMaxTokens, p.Executor.KernelSmallExpertBytes})

	for _, bad := range []int64{-1, KernelMaxTokens + 1} {
		err := tune(bad)
		require.ErrorIs(t, err, ErrInvalid)
		assert.Contains(t, err.Error(), "kernel_max_tokens")
	}
	_, err = ParseTuning([]byte(`{"kernel_max_tokens": "4"}`))
	require.ErrorIs(t, err, ErrInvalid)

	off, _ := execEngine(t, backend.Capabilities{}, "swiglu", 1, 4, 2)
	n := int64(2)
	err = off.Tune(Tuning{KernelMaxTokens: &n})
	require.ErrorIs(t, err, ErrUnsupported)
	assert.Contains(t, err.Error(), "caller's code", "it says why the kernels are off")
	n = 0
	require.NoError(t, off.Tune(Tuning{KernelMaxTokens: &n}), "the default needs no kernels")
}

func TestPathNamesAreStable(t *testing.T) {
	// The values cross the C ABI (MOE_PATH_*): they never change.
	for p, want := range map[Path]string{1: "mapped", 2: "kernels", 3: "host-stream", 4: "host-stacked", 5: "need-routing"} {
		assert.Equal(t, want, p.String())
	}
	assert.Equal(t, "Path(9)", Path(9).String())
	assert.Less(t, int(PathNeedRouting), numPaths)
}

// gpuCaps is the CPU backend reporting a kernel backend's capabilities:
// the CPU's reference FFN and mapped mode stand in for the CUDA ones, so
// every path runs here.
type gpuCaps struct {
	*backend.CPU
	caps backend.Capabilities
}

func (g gpuCaps) Capabilities() backend.Capabilities { return g.caps }

func execEngine(t *testing.T, caps backend.Capabilities, ffn string, L, E, slots int, before ...func(*Engine)) (*Engine, Plan) {
	t.Helper()
	withCaps := func(e *Engine) {
		e.NewBackend = func(cfg Config) (backend.Backend, error) { return gpuCaps{backend.NewCPU(cfg.Workers), caps}, nil }
	}
	return bf16Engine(t, Setup{Layout: mixtralSpec, FFN: ffn}, L, E, slots, append(before, withCaps)...)
}

var kernelCaps = backend.Capabilities{ExpertKernels: true, Mapped: true, MaxMappedPairs: 64}

func TestExecutorPlanReportsWhatTheBackendAndModelAllow(t *testing.T) {
	_, p := execEngine(t, kernelCaps, "swiglu", 1, 4, 2)
	assert.Equal(t, ExecutorPlan{Kernels: true, Mapped: true, DType: dtype.BF16, Hidden: mH, Inter: mI, MaxMappedPairs: 64,
		KernelMaxTokens: KernelMaxTokens, KernelSmallExpertBytes: KernelSmallExpertBytes, KernelCrossover: CrossoverDefault,
		HybridOff:       `cpu_experts "auto" is off on the CPU backend (a thread count turns it on)`,
		GraphHandOffOff: `hybrid execution is off: cpu_experts "auto" is off on the CPU backend (a thread count turns it on)`}, p.Executor)

	_, p = execEngine(t, kernelCaps, "none", 1, 4, 2)
	assert.False(t, p.Executor.Kernels)
	assert.Contains(t, p.Executor.KernelsOff, "not standard SwiGLU")

	_, p = execEngine(t, backend.Capabilities{}, "swiglu", 1, 4, 2)
	assert.False(t, p.Executor.Kernels || p.Executor.Mapped)
	assert.Equal(t, dtype.Invalid, p.Executor.DType)
	assert.Contains(t, p.Executor.KernelsOff, "caller's code")

	_, p = execEngine(t, backend.Capabilities{ExpertKernels: true}, "swiglu", 1, 4, 2)
	assert.True(t, p.Executor.Kernels)
	assert.False(t, p.Executor.Mapped, "no mapped mode without the capability")
}

func TestLayerRunsEveryPathAndEachMatchesTheReference(t *testing.T) {
	const L, E, T, K = 2, 4, 2, 2
	e, _ := execEngine(t, kernelCaps, "swiglu", L, E, 4)
	oracle := mappedEngine(t, L, E, 4)
	rng := rand.New(rand.NewPCG(5, 6))
	io := newFFNIO(rng, T, K, E)
	want := reference(t, oracle, io, 1, T, K)
	req, err := e.BeginRequest()
	require.NoError(t, err)

	for _, tc := range []struct {
		name  string
		flags LayerFlags
		host  bool
		want  Path
	}{
		{"mapped", 0, false, PathMapped},
		{"kernels", LayerNoMapped, true, PathKernels},
	} {
		clear(io.out)
		a := LayerArgs{FFNCall: io.call(1, T, K), Reqs: []uint64{req}, Flags: tc.flags}
		a.WDType = dtype.F32
		if tc.host {
			a.TopKHost = io.topk
		}
		r, err := e.Layer(a)
		require.NoError(t, err, tc.name)
		assert.Equal(t, tc.want, r.Path, tc.name)
		assert.Nil(t, r.Experts, "kernel paths hand nothing back")
		assert.Equal(t, want, io.out, "%s computes what the synchronous reference does", tc.name)
	}

	// Without the host routing the kernel path asks for it, and ran nothing.
	a := LayerArgs{FFNCall: io.call(1, T, K), Reqs: []uint64{req}, Flags: LayerNoMapped}
	r, err := e.Layer(a)
	require.NoError(t, err)
	assert.Equal(t, PathNeedRouting, r.Path)

	// The caller's own code: the routing is traced, the experts come back.
	a = LayerArgs{FFNCall: io.call(0, T, K), Reqs: []uint64{req}, TopKHost: io.topk, Flags: LayerNoKernels | LayerHostBatched}
	before, err := e.Stats()
	require.NoError(t, err)
	r, err = e.Layer(a)
	require.NoError(t, err)
	assert.Equal(t, PathHostStacked, r.Path)
	distinct := map[int32]bool{}
	for _, x := range io.topk {
		distinct[int32(x)] = true
	}
	assert.Len(t, r.Experts, len(distinct))
	for i, x := range r.Experts {
		assert.True(t, distinct[x])
		if i > 0 {
			assert.Less(t, r.Experts[i-1], x, "ascending")
		}
	}
	after, err := e.Stats()
	require.NoError(t, err)
	var routed float64
	for _, n := range after.Layers[0].ExpertTokens {
		routed += n
	}
	var routedBefore float64
	for _, n := range before.Layers[0].ExpertTokens {
		routedBefore += n
	}
	assert.Equal(t, float64(T*K), routed-routedBefore, "the host path traced every (token, expert) pair")
	assert.Equal(t, map[string]int64{"mapped": 1, "kernels": 1, "need-routing": 1, "host-stacked": 1, "host-stream": 0}, after.Paths)
}

func TestLayerFallsBackWhenMappedModeCannotStart(t *testing.T) {
	// A backend that claims mapped mode but whose model the kernels cannot
	// read in place: the first call finds out, later calls skip it.
	const L, E, T, K = 1, 4, 1, 2
	e, _ := execEngine(t, kernelCaps, "swiglu", L, E, 4, func(e *Engine) {
		e.mapped.once.Do(func() { e.mapped.err = errMappedUnavailable }) // Configure tries it
	})
	io := newFFNIO(rand.New(rand.NewPCG(7, 8)), T, K, E)
	r, err := e.Layer(LayerArgs{FFNCall: io.call(0, T, K), TopKHost: io.topk})
	require.NoError(t, err)
	assert.Equal(t, PathKernels, r.Path)
	st, err := e.Stats()
	require.NoError(t, err)
	assert.Contains(t, st.MappedOff, "mapped mode unavailable")
	assert.Equal(t, int64(0), st.Paths["mapped"], "the failed try is not counted as a mapped call")
}

func TestLayerRejectsBadArguments(t *testing.T) {
	e, _ := execEngine(t, kernelCaps, "swiglu", 1, 4, 2)
	io := newFFNIO(rand.New(rand.NewPCG(9, 9)), 2, 2, 4)
	for _, tc := range []struct {
		name string
		a    LayerArgs
	}{
		{"no tokens", LayerArgs{FFNCall: FFNCall{T: 0, K: 2}}},
		{"routing of the wrong length", LayerArgs{FFNCall: io.call(0, 2, 2), TopKHost: io.topk[:3]}},
		{"expert out of range", LayerArgs{FFNCall: io.call(0, 2, 2), TopKHost: []int64{0, 1, 2, 4}}},
	} {
		_, err := e.Layer(tc.a)
		assert.ErrorIs(t, err, ErrInvalid, tc.name)
	}
}

func TestLayerTracesRoutingWithGaps(t *testing.T) {
	// Capacity-dropping routers (Switch, NLLB-MoE) leave tokens with fewer
	// than k experts: -1 places count for nothing, and only with the flag.
	const L, E = 1, 4
	e, _ := execEngine(t, kernelCaps, "swiglu", L, E, 4)
	a, err := e.BeginRequest()
	require.NoError(t, err)
	b, err := e.BeginRequest()
	require.NoError(t, err)
	// Four tokens, k = 2: tokens 0-1 are request a's, 2-3 request b's.
	topk := []int64{2, RoutingGap, RoutingGap, RoutingGap, 0, 2, 3, RoutingGap}
	io := newFFNIO(rand.New(rand.NewPCG(1, 1)), 4, 2, E)
	_, err = e.Layer(LayerArgs{FFNCall: io.call(0, 4, 2), Reqs: []uint64{a, b}, TopKHost: topk})
	require.ErrorIs(t, err, ErrInvalid, "without the flag -1 is an expert out of range")
	r, err := e.Layer(LayerArgs{FFNCall: io.call(0, 4, 2), Reqs: []uint64{a, b}, TopKHost: topk, Flags: LayerRoutingGaps})
	require.NoError(t, err)
	assert.Equal(t, PathHostStream, r.Path, "the kernels would read -1 as an expert")
	assert.Equal(t, []int32{0, 2, 3}, r.Experts)
	st, err := e.Stats()
	require.NoError(t, err)
	assert.Equal(t, []float64{1, 0, 2, 1}, st.Layers[0].ExpertTokens)
	_, err = e.Layer(LayerArgs{FFNCall: io.call(0, 4, 2), TopKHost: []int64{0, -2, 1, 1, 0, 0, 1, 1}, Flags: LayerRoutingGaps})
	assert.ErrorIs(t, err, ErrInvalid, "only -1 is a gap")
}

func TestReferenceKernelsOfferTheCPUBackendsFFNToTheExecutor(t *testing.T) {
	for _, on := range []bool{false, true} {
		e, err := New(Config{BudgetBytes: 4 * 4096, ReferenceKernels: on})
		require.NoError(t, err)
		bf16Model(t, e, 1, 4)
		p, err := e.Configure(Setup{Layout: mixtralSpec, FFN: "swiglu"})
		require.NoError(t, err)
		assert.Equal(t, on, p.Executor.Kernels)
		assert.Equal(t, on, p.Executor.Mapped)
		if on {
			assert.Equal(t, int64(backend.CPUMappedPairs), p.Executor.MaxMappedPairs)
		}
		require.NoError(t, e.Close())
	}
}
