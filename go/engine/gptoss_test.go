package engine

import (
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/backend"
	"github.com/moe-infinity/moe_infinity/go/dtype"
	"github.com/moe-infinity/moe_infinity/go/layout"
)

// The gpt-oss test model: fused experts as the releases keep them, hidden
// gH and intermediate gI (multiples of the MXFP4 block).
const gH, gI = 64, 32

// gptOssModel registers L layers of E gpt-oss experts: MXFP4 blocks and
// e8m0 scales when mxfp4, else bfloat16 gate_up_proj [E, H, 2I] and
// down_proj [E, I, H]; bfloat16 biases.
func gptOssModel(t *testing.T, e *Engine, L, E int, mxfp4 bool) {
	t.Helper()
	rng := rand.New(rand.NewPCG(uint64(L), uint64(E)))
	bf := func(n int, scale float64) []byte {
		v := make([]float32, n)
		for i := range v {
			v[i] = float32(rng.NormFloat64() * scale)
		}
		return bf16Bytes(v)
	}
	u8 := func(n int, lo, span int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(lo + rng.IntN(span))
		}
		return b
	}
	for l := range L {
		p := fmt.Sprintf("model.layers.%d.mlp.experts.", l)
		add := func(name, dt string, data []byte, shape ...int64) {
			require.NoError(t, e.AddHostTensor(p+name, dt, append([]int64{int64(E)}, shape...), data))
		}
		if mxfp4 {
			add("gate_up_proj_blocks", "U8", u8(E*2*gI*gH/2, 0, 256), 2*gI, gH/32, 16)
			add("gate_up_proj_scales", "U8", u8(E*2*gI*gH/32, 122, 6), 2*gI, gH/32)
			add("down_proj_blocks", "U8", u8(E*gH*gI/2, 0, 256), gH, gI/32, 16)
			add("down_proj_scales", "U8", u8(E*gH*gI/32, 122, 6), gH, gI/32)
		} else {
			add("gate_up_proj", "BF16", bf(E*gH*2*gI, 0.2), gH, 2*gI)
			add("down_proj", "BF16", bf(E*gI*gH, 0.2), gI, gH)
		}
		add("gate_up_proj_bias", "BF16", bf(E*2*gI, 0.5), 2*gI)
		add("down_proj_bias", "BF16", bf(E*gH, 0.5), gH)
	}
}

func gptOssSpec(mxfp4 bool) layout.Spec {
	s := layout.Spec{}
	if mxfp4 {
		s.QuantMethod = "mxfp4"
	}
	for _, name := range layout.GptOssRegions {
		s.Regions = append(s.Regions, layout.RegionSpec{Name: name, Parts: []string{name}, DType: "bfloat16"})
	}
	return s
}

func gptOssEngine(t *testing.T, cfg Config, caps *backend.Capabilities, L, E int, mxfp4 bool) (*Engine, Plan) {
	t.Helper()
	cfg.BudgetBytes, cfg.Prefetch = 1<<22, noPrefetch()
	if caps != nil {
		cfg.Backend = "cuda"
	}
	e, err := New(cfg)
	require.NoError(t, err)
	t.Cleanup(func() { _ = e.Close() })
	if caps != nil {
		e.NewBackend = func(cfg Config) (backend.Backend, error) { return gpuCaps{backend.NewCPU(cfg.Workers), *caps}, nil }
	}
	gptOssModel(t, e, L, E, mxfp4)
	alpha, limit := 1.702, 7.0
	p, err := e.Configure(Setup{Layout: gptOssSpec(mxfp4), FFN: "gpt_oss", SwigluAlpha: &alpha, SwigluLimit: &limit})
	require.NoError(t, err)
	return e, p
}

func TestGptOssExecutorPlan(t *testing.T) {
	gpu := backend.Capabilities{ExpertKernels: true, Mapped: true, MaxMappedPairs: 4096, QuantFormats: []string{"fp8", "mxfp4"}, FFNKinds: []string{"gpt_oss"}}
	swigluOnly := backend.Capabilities{ExpertKernels: true, Mapped: true, MaxMappedPairs: 4096, QuantFormats: []string{"fp8"}}
	tests := []struct {
		name    string
		cfg     Config
		caps    *backend.Capabilities
		mxfp4   bool
		kernels bool
		off     string
	}{
		{"CPU reference kernels, bfloat16", Config{ReferenceKernels: true}, nil, false, true, ""},
		{"CPU reference kernels, MXFP4", Config{ReferenceKernels: true}, nil, true, true, ""},
		{"CPU backend, reference kernels off", Config{}, nil, false, false, "caller's code"},
		{"CPU SIMD kernels compute SwiGLU experts only", Config{CPUExperts: 1}, nil, false, false, "do not compute gpt_oss experts"},
		{"GPU without quantized_kernels: opt-in until run on a GPU", Config{}, &gpu, false, false, "quantized_kernels"},
		{"GPU, MXFP4, without quantized_kernels", Config{}, &gpu, true, false, "quantized_kernels"},
		{"GPU with quantized_kernels, bfloat16", Config{QuantizedKernels: &kernelsOn}, &gpu, false, true, ""},
		{"GPU with quantized_kernels, MXFP4", Config{QuantizedKernels: &kernelsOn}, &gpu, true, true, ""},
		{"GPU kernels without gpt-oss ones", Config{QuantizedKernels: &kernelsOn}, &swigluOnly, false, false, "do not compute gpt_oss experts"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, p := gptOssEngine(t, tc.cfg, tc.caps, 1, 4, tc.mxfp4)
			ex := p.Executor
			require.Equal(t, tc.kernels, ex.Kernels, ex.KernelsOff)
			assert.False(t, ex.Hybrid)
			if !tc.kernels {
				assert.Contains(t, ex.KernelsOff, tc.off)
				assert.Empty(t, ex.Quant)
				assert.False(t, ex.Mapped)
				return
			}
			assert.True(t, ex.Mapped, "mapped mode reads gpt-oss experts (biases and scales too) in place")
			assert.Equal(t, dtype.BF16, ex.DType)
			assert.Equal(t, [2]int64{gH, gI}, [2]int64{ex.Hidden, ex.Inter})
			if tc.mxfp4 {
				assert.Equal(t, "mxfp4", ex.Quant)
			} else {
				assert.Empty(t, ex.Quant)
			}
		})
	}
	_, p := gptOssEngine(t, Config{ReferenceKernels: true, CPUExperts: 1}, nil, 1, 4, false)
	assert.True(t, p.Executor.Kernels)
	assert.Contains(t, p.Executor.HybridOff, "not gpt-oss ones")
}

// gptOssOnViews computes io's layer with the CPU reference over the
// experts as the caller's code sees them (slots, or MXFP4 experts
// dequantized into views by Acquire), through bfloat16 gpt-oss tables.
func gptOssOnViews(t *testing.T, e *Engine, io *ffnIO, layer, T, K, E int) []byte {
	t.Helper()
	views, release := acquireAll(t, e, layer, E)
	defer release()
	p, _ := e.Plan()
	var off [4]int64
	for i, name := range layout.GptOssRegions {
		r, ok := p.Layout.Region(name)
		require.True(t, ok, name)
		off[i] = r.Offset
	}
	ref := &ffnIO{x: io.x, out: make([]byte, len(io.out)), scratch: make([]float32, len(io.scratch)), topk: io.topk, weights: io.weights}
	c := ref.call(layer, T, K)
	q := &backend.GptOssArgs{Alpha: 1.702, Limit: 7, GateUpBias: make([]uint64, E), DownBias: make([]uint64, E)}
	a := backend.FFNArgs{X: c.X, Out: c.Out, Scratch: c.Scratch, TopK: c.TopK, Weights: c.Weights, T: c.T, K: c.K,
		Hidden: gH, Inter: gI, DType: dtype.BF16, WDType: dtype.F32, GateUp: make([]uint64, E), Down: make([]uint64, E), GptOss: q}
	for i, v := range views {
		base, err := e.SlotAddr(int(v))
		require.NoError(t, err)
		b := uint64(base)
		a.GateUp[i], q.GateUpBias[i], a.Down[i], q.DownBias[i] = b+uint64(off[0]), b+uint64(off[1]), b+uint64(off[2]), b+uint64(off[3])
	}
	require.NoError(t, backend.NewCPU(1).ReferenceFFN(a))
	return ref.out
}

func TestGptOssKernelsComputeFromTheSlotsWhatTheCallersViewsGive(t *testing.T) {
	const L, E, T, K = 2, 4, 3, 2
	for _, mxfp4 := range []bool{false, true} {
		t.Run(fmt.Sprintf("mxfp4=%t", mxfp4), func(t *testing.T) {
			e, p := gptOssEngine(t, Config{ReferenceKernels: true}, nil, L, E, mxfp4)
			require.True(t, p.Executor.Kernels, p.Executor.KernelsOff)
			rng := rand.New(rand.NewPCG(5, 6))
			req, err := e.BeginRequest()
			require.NoError(t, err)
			// Mapped first: every expert is read in place from the host
			// tensors (blocks, scales and biases each a tensor of its own).
			for _, step := range []struct {
				flags LayerFlags
				path  Path
			}{{0, PathMapped}, {LayerNoMapped, PathKernels}, {0, PathMapped}} {
				for layer := range L {
					io := ffnIOOf(rng, T, K, E, gH, gI, func() float32 { return float32(rng.Float64()) })
					r, err := e.Layer(LayerArgs{FFNCall: io.call(layer, T, K), Reqs: []uint64{req}, TopKHost: io.topk, Flags: step.flags})
					require.NoError(t, err)
					require.Equal(t, step.path, r.Path)
					assert.Equal(t, gptOssOnViews(t, e, io, layer, T, K, E), io.out,
						"layer %d, %s: the kernels give, bit for bit, the gpt-oss FFN of the experts the caller's code reads", layer, step.path)
					assert.NotEqual(t, make([]byte, len(io.out)), io.out)
				}
			}
			io := ffnIOOf(rng, 20, K, E, gH, gI, func() float32 { return 0.5 })
			r, err := e.Layer(LayerArgs{FFNCall: io.call(0, 20, K), Reqs: []uint64{req}, TopKHost: io.topk})
			require.NoError(t, err)
			assert.Equal(t, PathHostStream, r.Path, "prefill past the kernel crossover runs the caller's code")
		})
	}
}

func TestSetupSwigluConstants(t *testing.T) {
	tests := []struct {
		json string
		err  string
	}{
		{`{"layout":{"regions":[]},"ffn":"gpt_oss","swiglu_alpha":1.702,"swiglu_limit":7}`, ""},
		{`{"layout":{"regions":[]},"ffn":"gpt_oss"}`, ""},
		{`{"layout":{"regions":[]},"ffn":"swiglu","swiglu_limit":7}`, "gpt-oss's constants"},
		{`{"layout":{"regions":[]},"ffn":"gpt_oss","swiglu_limit":0}`, "swiglu_limit 0 must be positive"},
		{`{"layout":{"regions":[]},"ffn":"gpt_oss","swiglu_limit":-1}`, "must be positive"},
	}
	for _, tc := range tests {
		t.Run(tc.json, func(t *testing.T) {
			s, err := ParseSetup([]byte(tc.json))
			if tc.err == "" {
				require.NoError(t, err)
				assert.Equal(t, "gpt_oss", s.FFN)
				return
			}
			assert.ErrorIs(t, err, ErrInvalid)
			assert.ErrorContains(t, err, tc.err)
		})
	}
}
