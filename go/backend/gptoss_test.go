package backend

import (
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/dtype"
	"github.com/moe-infinity/moe_infinity/go/quant"
)

// gptOssExpert is one random MXFP4 gpt-oss expert: its blocks and e8m0
// scales as the checkpoint stores them (gate_up [2I, H/32, 16] and
// [2I, H/32], down [H, I/32, 16] and [H, I/32]), its biases, and its
// matrices dequantized as transformers does (gate_up [H, 2I], down [I, H]).
type gptOssExpert struct {
	guBlocks, guScales, dnBlocks, dnScales []byte
	guBias, dnBias                         []byte
	guDeq, dnDeq                           []byte
}

// randMXFP4 returns the blocks and scales of a random MXFP4 weight
// [rows, cols]; the scales stay near 2^0 so the products need no range.
func randMXFP4(r *rand.Rand, rows, cols int) (blocks, scales []byte) {
	blocks = make([]byte, rows*cols/2)
	scales = make([]byte, rows*cols/32)
	for i := range blocks {
		blocks[i] = byte(r.IntN(256))
	}
	for i := range scales {
		scales[i] = byte(120 + r.IntN(8))
	}
	return blocks, scales
}

func randVec(t *testing.T, r *rand.Rand, n int, dt dtype.DType, scale float64) []byte {
	t.Helper()
	v := make([]float32, n)
	for i := range v {
		v[i] = float32(r.NormFloat64() * scale)
	}
	b := make([]byte, 2*n)
	require.NoError(t, dtype.Convert(b, dt, f32s(v), dtype.F32))
	return b
}

func makeGptOssExpert(t *testing.T, r *rand.Rand, H, I int, dt dtype.DType) gptOssExpert {
	t.Helper()
	var e gptOssExpert
	e.guBlocks, e.guScales = randMXFP4(r, 2*I, H)
	e.dnBlocks, e.dnScales = randMXFP4(r, H, I)
	e.guBias, e.dnBias = randVec(t, r, 2*I, dt, 0.5), randVec(t, r, H, dt, 0.5)
	e.guDeq, e.dnDeq = make([]byte, 2*H*2*I), make([]byte, 2*I*H)
	require.NoError(t, quant.DequantMXFP4Transposed(e.guDeq, dt, e.guBlocks, e.guScales, 2*I, H))
	require.NoError(t, quant.DequantMXFP4Transposed(e.dnDeq, dt, e.dnBlocks, e.dnScales, H, I))
	return e
}

func TestReferenceFFNReadsGptOssMXFP4SlotsAsTheDequantizedExperts(t *testing.T) {
	tests := []struct {
		name   string
		H, I   int
		T, K   int64
		dt     dtype.DType
		wdtype dtype.DType
		limit  float32
	}{
		{"one token, bfloat16, float32 routing weights", 64, 32, 1, 2, dtype.BF16, dtype.F32, 7},
		{"several tokens, bfloat16 routing weights (products rounded)", 96, 64, 3, 2, dtype.BF16, dtype.BF16, 7},
		{"float16", 64, 96, 2, 3, dtype.F16, dtype.F16, 7},
		{"a limit that clamps most gates and ups", 64, 32, 2, 2, dtype.BF16, dtype.BF16, 0.5},
		{"SIMD kernels on: gpt-oss calls fall back to the reference", 64, 32, 2, 2, dtype.BF16, dtype.F32, 7},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := rand.New(rand.NewPCG(uint64(tc.H), uint64(tc.I)))
			const E = 3
			mx := FFNArgs{T: tc.T, K: tc.K, Hidden: int64(tc.H), Inter: int64(tc.I), WDType: tc.wdtype,
				GateUp: make([]uint64, E), Down: make([]uint64, E),
				GptOss: &GptOssArgs{Alpha: 1.702, Limit: tc.limit, MXFP4: true, GateUpBias: make([]uint64, E), DownBias: make([]uint64, E),
					GateUpScale: make([]uint64, E), DownScale: make([]uint64, E)}}
			deq := FFNArgs{T: tc.T, K: tc.K, Hidden: int64(tc.H), Inter: int64(tc.I), WDType: tc.wdtype,
				GateUp: make([]uint64, E), Down: make([]uint64, E),
				GptOss: &GptOssArgs{Alpha: 1.702, Limit: tc.limit, GateUpBias: make([]uint64, E), DownBias: make([]uint64, E)}}
			for x := range E {
				e := makeGptOssExpert(t, r, tc.H, tc.I, tc.dt)
				mx.GateUp[x], mx.Down[x] = addr(e.guBlocks), addr(e.dnBlocks)
				mx.GptOss.GateUpScale[x], mx.GptOss.DownScale[x] = addr(e.guScales), addr(e.dnScales)
				deq.GateUp[x], deq.Down[x] = addr(e.guDeq), addr(e.dnDeq)
				for _, a := range []FFNArgs{mx, deq} {
					a.GptOss.GateUpBias[x], a.GptOss.DownBias[x] = addr(e.guBias), addr(e.dnBias)
				}
			}
			x := randVec(t, r, int(tc.T)*tc.H, tc.dt, 1)
			ids := make([]int64, tc.T*tc.K)
			w := make([]float32, tc.T*tc.K)
			for i := range ids {
				ids[i], w[i] = int64((i*2+1)%E), float32(r.Float64())
			}
			wb := f32s(w)
			if tc.wdtype != dtype.F32 {
				wdt := tc.wdtype
				wb = make([]byte, 2*len(w))
				require.NoError(t, dtype.Convert(wb, wdt, f32s(w), dtype.F32))
			}
			c := NewCPU(1)
			if tc.name[:4] == "SIMD" {
				c.ExpertThreads = 2
			}
			require.NoError(t, c.Open(1, 64, &patternSource{size: 64}))
			defer c.Close()
			run := func(a FFNArgs) []float32 {
				out := make([]byte, len(x))
				scratch := make([]float32, a.T*a.K*a.Inter)
				a.X, a.Out, a.Scratch, a.TopK, a.Weights = addr(x), addr(out), addr(scratch), addr(ids), addr(wb)
				a.DType = tc.dt
				require.NoError(t, c.FFN(a))
				return toF32(out, tc.dt)
			}
			got, want := run(mx), run(deq)
			assert.Equal(t, want, got, "MXFP4 slots read in place compute what the dequantized experts do, bit for bit")
			assert.NotZero(t, got[0])
		})
	}
}

func TestReferenceFFNGptOssKnownValues(t *testing.T) {
	// One expert, H = 2, I = 1, bfloat16. x = [1, 2]; gate_up [H, 2I] =
	// [[1, 0.5], [0.25, 1]] (column 0 gate, column 1 up): gate 1.5, up 2.5;
	// bias [0.5, -0.5]: g = 2, u = 2. down [I, H] = [[1, -1]], bias
	// [0.25, 0]; routing weight 0.5 (float32: the product is not rounded).
	bf := func(v ...float32) []byte {
		b := make([]byte, 2*len(v))
		require.NoError(t, dtype.Convert(b, dtype.BF16, f32s(v), dtype.F32))
		return b
	}
	tests := []struct {
		name  string
		limit float32
		want  []float32
	}{
		// g·α = 3.404 → bf16 3.40625; sigmoid 0.96793 → 0.96875; glu 1.9375;
		// h = (2+1)·1.9375 = 5.8125; o = [6.0625, -5.8125]; × 0.5.
		{"no clamp", 7, []float32{3.03125, -2.90625}},
		// g = min(2, 1) = 1, u = 1; g·α = 1.702 → 1.703125; sigmoid 0.84597 →
		// 0.84765625; h = 2·0.84765625 = 1.6953125; o = [1.9453125, -1.6953125].
		{"gate and up clamped at the limit", 1, []float32{0.97265625, -0.84765625}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			gu, gb, dn, db := bf(1, 0.5, 0.25, 1), bf(0.5, -0.5), bf(1, -1), bf(0.25, 0)
			a := FFNArgs{T: 1, K: 1, Hidden: 2, Inter: 1, GateUp: []uint64{addr(gu)}, Down: []uint64{addr(dn)},
				GptOss: &GptOssArgs{Alpha: 1.702, Limit: tc.limit, GateUpBias: []uint64{addr(gb)}, DownBias: []uint64{addr(db)}}}
			got := runFFN(t, NewCPU(1), a, bf(1, 2), []int64{0}, []float32{0.5}, dtype.BF16)
			assert.Equal(t, tc.want, got)
		})
	}
}

func TestGptOssArgsValidate(t *testing.T) {
	one := []uint64{2}
	base := FFNArgs{X: 1, Out: 1, Scratch: 1, TopK: 1, Weights: 1, T: 1, K: 1, Hidden: 64, Inter: 32, DType: dtype.BF16, WDType: dtype.F32, GateUp: []uint64{1}, Down: []uint64{1}}
	good := func() GptOssArgs { return GptOssArgs{Alpha: 1.702, Limit: 7, GateUpBias: one, DownBias: one} }
	tests := []struct {
		name string
		mod  func(a *FFNArgs, q *GptOssArgs)
		err  string
	}{
		{"good", func(*FFNArgs, *GptOssArgs) {}, ""},
		{"good MXFP4", func(_ *FFNArgs, q *GptOssArgs) { q.MXFP4, q.GateUpScale, q.DownScale = true, one, one }, ""},
		{"FP8 too", func(a *FFNArgs, _ *GptOssArgs) { a.FP8 = &FP8Args{} }, "not FP8"},
		{"an addend", func(a *FFNArgs, _ *GptOssArgs) { a.Addend = 8 }, "no addend"},
		{"zero limit", func(_ *FFNArgs, q *GptOssArgs) { q.Limit = 0 }, "limit"},
		{"no bias tables", func(_ *FFNArgs, q *GptOssArgs) { q.GateUpBias, q.DownBias = nil, nil }, "bias tables of 0 and 0 experts (want 1"},
		{"MXFP4 without scale tables", func(_ *FFNArgs, q *GptOssArgs) { q.MXFP4 = true }, "scale tables of 0 and 0"},
		{"MXFP4 with sizes off the block", func(a *FFNArgs, q *GptOssArgs) {
			q.MXFP4, q.GateUpScale, q.DownScale = true, one, one
			a.Inter = 40
		}, "multiples of 32"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			a, q := base, good()
			tc.mod(&a, &q)
			a.GptOss = &q
			err := a.Validate()
			if tc.err == "" {
				require.NoError(t, err)
				assert.Equal(t, a.GateUp[0], a.UpAddr(0), "gate and up interleave in gate_up: no up table")
				return
			}
			assert.ErrorContains(t, err, tc.err)
		})
	}
}

func TestReferenceFFNGptOssPairWithoutBiasesIsAnError(t *testing.T) {
	gu, dn := make([]byte, 2*2*2), make([]byte, 2*2)
	a := FFNArgs{T: 1, K: 1, Hidden: 2, Inter: 1, DType: dtype.BF16, WDType: dtype.F32, GateUp: []uint64{addr(gu)}, Down: []uint64{addr(dn)},
		GptOss: &GptOssArgs{Alpha: 1.702, Limit: 7, GateUpBias: []uint64{0}, DownBias: []uint64{0}}}
	out, scratch := make([]byte, 4), make([]float32, 1)
	a.X, a.Out, a.Scratch, a.TopK, a.Weights = addr(make([]byte, 4)), addr(out), addr(scratch), addr([]int64{0}), addr([]float32{1})
	assert.ErrorContains(t, NewCPU(1).FFN(a), "table entries are incomplete")
	a.SkipInvalid = true
	require.NoError(t, NewCPU(1).FFN(a), "skipped, as the GPU kernels skip it")
}

func TestCapabilitiesComputes(t *testing.T) {
	ref := NewCPU(1)
	ref.ReferenceKernels = true
	simd := NewCPU(1)
	simd.ExpertThreads = 2
	tests := []struct {
		name            string
		caps            Capabilities
		swiglu, gptOss  bool
		mxfp4Compressed bool
	}{
		{"reference kernels", ref.Capabilities(), true, true, true},
		{"SIMD kernels", simd.Capabilities(), true, false, false},
		{"no kernels", NewCPU(1).Capabilities(), false, false, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			assert.Equal(t, tc.swiglu, tc.caps.Computes("swiglu"))
			assert.Equal(t, tc.gptOss, tc.caps.Computes("gpt_oss"))
			assert.Equal(t, tc.mxfp4Compressed, tc.caps.ReadsQuant("mxfp4"))
			assert.False(t, tc.caps.Computes("none"))
		})
	}
}

func TestGptOssMappedLayoutEntries(t *testing.T) {
	bf16 := MappedLayout{GptOss: true, Gate: 0, RowsBytes: 64, Down: 256, DownBytes: 32, Biases: [2]int64{512, 768}, BiasBytes: [2]int64{8, 4}}
	mx := bf16
	mx.Scales, mx.ScaleBytes = [3]int64{1024, 0, 1280}, [3]int64{2, 0, 1}
	host := make([]byte, 2048)
	seg := func(off, n int64) Segment { return Segment{Offset: off, Data: host[off : off+n]} }
	segs := []Segment{seg(0, 64), seg(256, 32), seg(512, 8), seg(768, 4), seg(1024, 2), seg(1280, 1)}
	base := uintptr(addr(host))
	tests := []struct {
		name    string
		l       MappedLayout
		entries int
		fp8     bool
	}{
		{"bfloat16: matrices and biases", bf16, 4, false},
		{"MXFP4: blocks, biases, then scales", mx, 6, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			assert.Equal(t, tc.entries, tc.l.Entries())
			assert.Equal(t, tc.fp8, tc.l.FP8())
			rows, ok := ResolveHostRows(tc.l, segs)
			require.True(t, ok)
			want := HostRows{base, base + 512, base + 256, base + 768}
			if tc.entries == 6 {
				want[EntryOssGateUpScale], want[EntryOssDownScale] = base+1024, base+1280
			}
			assert.Equal(t, want, rows)
			assert.Equal(t, want, tc.l.SlotRows(base), "a slot holds the entries at the same offsets")
		})
	}
	odd := []Segment{{Offset: 0, Data: host[1:65]}, seg(256, 32), seg(512, 8), seg(768, 4)}
	_, ok := ResolveHostRows(bf16, odd)
	assert.False(t, ok, "bfloat16 rows at an odd address cannot be read in place")
	oddMX := []Segment{{Offset: 0, Data: host[1:65]}, seg(256, 32), seg(512, 8), seg(768, 4), seg(1024, 2), seg(1280, 1)}
	_, ok = ResolveHostRows(mx, oddMX)
	assert.True(t, ok, "MXFP4 blocks at any address: the kernels load them byte by byte when a row is not 16-byte aligned")

	gpt := &GptOssArgs{Alpha: 1.702, Limit: 7}
	for _, tc := range []struct {
		name string
		l    MappedLayout
		a    FFNArgs
		err  string
	}{
		{"gpt-oss arguments for gpt-oss tables", bf16, FFNArgs{GptOss: gpt}, ""},
		{"MXFP4 arguments for MXFP4 tables", mx, FFNArgs{GptOss: &GptOssArgs{MXFP4: true}}, ""},
		{"SwiGLU arguments for gpt-oss tables", bf16, FFNArgs{}, "gpt-oss arguments (false) for tables of gpt-oss experts (true)"},
		{"bfloat16 arguments for MXFP4 tables", mx, FFNArgs{GptOss: gpt}, "MXFP4 arguments (false) for tables with scales (true)"},
		{"FP8 arguments for MXFP4 tables", mx, FFNArgs{FP8: &FP8Args{}}, "FP8 arguments (true)"},
		{"gpt-oss arguments for SwiGLU tables", MappedLayout{RowsBytes: 4}, FFNArgs{GptOss: gpt}, "gpt-oss arguments (true)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.l.CheckArgs(tc.a)
			if tc.err == "" {
				assert.NoError(t, err)
				return
			}
			assert.ErrorContains(t, err, tc.err)
		})
	}
	a := mx.Tables(FFNArgs{GptOss: &GptOssArgs{MXFP4: true}}, 2, func(x int) HostRows { return HostRows{1 + uintptr(x), 3, 5, 7, 9, 11} })
	assert.Equal(t, []uint64{1, 2}, a.GateUp)
	assert.Equal(t, []uint64{5, 5}, a.Down)
	assert.Nil(t, a.Up)
	assert.Equal(t, [4][]uint64{{3, 3}, {7, 7}, {9, 9}, {11, 11}}, [4][]uint64{a.GptOss.GateUpBias, a.GptOss.DownBias, a.GptOss.GateUpScale, a.GptOss.DownScale})
}
