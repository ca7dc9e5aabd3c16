package engine

import (
	"encoding/binary"
	"encoding/json"
	"math"
	"math/rand/v2"
	"runtime"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/dtype"
)

func TestParseConfigCPUExperts(t *testing.T) {
	for _, tc := range []struct {
		name, json string
		want       CPUExperts
		err        string
	}{
		{"left out: auto", ``, CPUExpertsAuto, ""},
		{"off", `"off"`, CPUExpertsOff, ""},
		{"auto", `"auto"`, CPUExpertsAuto, ""},
		{"a thread count", `3`, 3, ""},
		{"the most threads", `1024`, MaxCPUExpertThreads, ""},
		{"zero threads", `0`, 0, "thread count from 1 to 1024"},
		{"negative", `-1`, 0, "thread count from 1 to 1024"},
		{"minus two", `-2`, 0, "thread count from 1 to 1024"},
		{"too many", `1025`, 0, "thread count from 1 to 1024"},
		{"a fraction", `1.5`, 0, "thread count"},
		{"an exponent", `1e1`, 0, "thread count"},
		{"a number in a string", `"4"`, 0, `unknown CPU expert mode (or a thread count) "4"`},
		{"a name in capitals", `"Auto"`, 0, "names are exact"},
		{"empty", `""`, 0, `unknown CPU expert mode`},
		{"null", `null`, 0, "null"},
		{"true", `true`, 0, "thread count"},
		{"an object", `{}`, 0, "thread count"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := `{"budget_bytes": 1}`
			if tc.json != "" {
				in = `{"budget_bytes": 1, "cpu_experts": ` + tc.json + `}`
			}
			c, err := ParseConfig([]byte(in))
			if tc.err != "" {
				require.ErrorIs(t, err, ErrInvalid, in)
				assert.Contains(t, err.Error(), "cpu_experts")
				assert.Contains(t, err.Error(), tc.err)
				return
			}
			require.NoError(t, err, in)
			assert.Equal(t, tc.want, c.CPUExperts)
			b, err := json.Marshal(c)
			require.NoError(t, err)
			again, err := ParseConfig(b)
			require.NoError(t, err, "the config's JSON reads back: %s", b)
			assert.Equal(t, c.CPUExperts, again.CPUExperts)
		})
	}
}

func TestCPUExpertsThreads(t *testing.T) {
	for _, b := range []string{"cpu", "cuda"} {
		assert.Equal(t, 0, CPUExpertsOff.Threads(b), b)
		assert.Equal(t, 5, CPUExperts(5).Threads(b), b)
	}
	assert.Equal(t, max(runtime.NumCPU()-HostThreadsReserved, 1), CPUExpertsAuto.Threads("cuda"), "auto: on with a GPU backend, cores left to the engine's own threads")
	assert.Equal(t, 0, CPUExpertsAuto.Threads("cpu"), "auto: off on the CPU backend (transformers' code, bitwise)")
	_, err := New(Config{BudgetBytes: 1, CPUExperts: -2})
	assert.ErrorIs(t, err, ErrInvalid)
	c, err := New(Config{BudgetBytes: 1})
	require.NoError(t, err)
	assert.Equal(t, CPUExpertsAuto, c.Config().CPUExperts, "the zero value is the default, auto")
}

// cpuExpertsEngine is the bf16 test model on the CPU backend with
// cpu_experts set.
func cpuExpertsEngine(t *testing.T, mode CPUExperts, L, E, slots int) (*Engine, Plan) {
	t.Helper()
	e, err := New(Config{BudgetBytes: int64(slots) * 4096, MaxSlots: slots, CPUExperts: mode})
	require.NoError(t, err)
	bf16Model(t, e, L, E)
	p, err := e.Configure(Setup{Layout: mixtralSpec, FFN: "swiglu"})
	require.NoError(t, err)
	t.Cleanup(func() { _ = e.Close() })
	return e, p
}

func TestCPUExpertsRunDecodeLayersOnTheKernels(t *testing.T) {
	const L, E, K = 2, 4, 2
	for _, mode := range []CPUExperts{CPUExpertsOff, CPUExpertsAuto} {
		_, off := cpuExpertsEngine(t, mode, L, E, 4)
		assert.False(t, off.Executor.Kernels, "%d: transformers' code computes the experts on the CPU backend", mode)
	}

	for _, mode := range []CPUExperts{CPUExperts(runtime.NumCPU()), 1, 3} {
		e, p := cpuExpertsEngine(t, mode, L, E, 4)
		assert.True(t, p.Executor.Kernels, "%d: %s", mode, p.Executor.KernelsOff)
		assert.False(t, p.Executor.Mapped, "the SIMD kernels read slots only: no mapped mode")
		oracle := mappedEngine(t, L, E, 4) // the reference FFN on the slots
		for _, T := range []int{1, 3, 16} {
			io := newFFNIO(rand.New(rand.NewPCG(uint64(T), 11)), T, K, E)
			want := reference(t, oracle, io, 1, T, K)
			req, err := e.BeginRequest()
			require.NoError(t, err)
			clear(io.out)
			a := LayerArgs{FFNCall: io.call(1, T, K), Reqs: []uint64{req}, TopKHost: io.topk}
			a.WDType = dtype.F32
			r, err := e.Layer(a)
			require.NoError(t, err)
			assert.Equal(t, PathKernels, r.Path, "%d tokens", T)
			assertBF16Close(t, want, io.out)
		}
	}
}

// assertBF16Close: the SIMD kernels sum in another order than the
// reference (package cpuffn), so an element may be off by 2 bfloat16 ulps
// of itself plus one of its token's largest element.
func assertBF16Close(t *testing.T, want, got []byte) {
	t.Helper()
	require.Len(t, got, len(want))
	val := func(b []byte, i int) float64 {
		return float64(math.Float32frombits(uint32(binary.LittleEndian.Uint16(b[2*i:])) << 16))
	}
	for i := 0; i < len(want)/2; i++ {
		row := i / mH
		rowMax := 0.0
		for c := row * mH; c < (row+1)*mH; c++ {
			rowMax = math.Max(rowMax, math.Abs(val(want, c)))
		}
		w, g := val(want, i), val(got, i)
		assert.LessOrEqual(t, math.Abs(w-g), (2*math.Abs(w)+rowMax)/256, "element %d", i)
	}
}

func TestAutoThreadsLeavesTheEngineItsCores(t *testing.T) {
	for _, c := range []struct{ cores, want int }{{1, 1}, {2, 1}, {3, 1}, {4, 2}, {16, 14}, {128, 126}} {
		assert.Equal(t, c.want, autoThreads(c.cores), "%d cores", c.cores)
	}
}
