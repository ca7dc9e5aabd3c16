package engine

import (
	"encoding/json"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestStatsCountTokensPerExpert checks expert_tokens against routings whose
// per-expert token counts are known, through each way routing reaches the
// engine, and that ResetStats zeroes them.
func TestStatsCountTokensPerExpert(t *testing.T) {
	const L, E = 2, 4
	for _, tc := range []struct {
		name string
		// run routes tokens through e and returns the expected counts.
		run func(t *testing.T, e *Engine) [L][E]float64
	}{
		{"observe, two requests", func(t *testing.T, e *Engine) [L][E]float64 {
			a, err := e.BeginRequest()
			require.NoError(t, err)
			b, err := e.BeginRequest()
			require.NoError(t, err)
			require.NoError(t, e.Observe(1, []uint64{a, b}, [][]float32{{0, 3, 0, 1}, {2, 1, 0, 0}}))
			require.NoError(t, e.Observe(1, []uint64{a}, [][]float32{{0, 0, 0, 5}}))
			require.NoError(t, e.EndRequest(a))
			require.NoError(t, e.EndRequest(b))
			return [L][E]float64{{}, {2, 4, 0, 6}}
		}},
		{"layer on the kernel path, tokens split between requests", func(t *testing.T, e *Engine) [L][E]float64 {
			const T, K = 4, 2
			io := newFFNIO(rand.New(rand.NewPCG(3, 4)), T, K, E)
			var want [L][E]float64
			for _, x := range io.topk {
				want[0][x]++
			}
			a, err := e.BeginRequest()
			require.NoError(t, err)
			b, err := e.BeginRequest()
			require.NoError(t, err)
			kernelLayer(t, e, io.call(0, T, K), []uint64{a, b}, io.topk)
			return want
		}},
		{"layer on the kernel path, three requests share four tokens", func(t *testing.T, e *Engine) [L][E]float64 {
			const T, K = 4, 1
			io := newFFNIO(rand.New(rand.NewPCG(5, 6)), T, K, E)
			var want [L][E]float64
			for _, x := range io.topk {
				want[0][x]++
			}
			var reqs []uint64
			for range 3 {
				r, err := e.BeginRequest()
				require.NoError(t, err)
				reqs = append(reqs, r)
			}
			kernelLayer(t, e, io.call(0, T, K), reqs, io.topk)
			return want
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e, _ := execEngine(t, kernelCaps, "swiglu", L, E, 8)
			want := tc.run(t, e)
			st, err := e.Stats()
			require.NoError(t, err)
			require.Len(t, st.Layers, L)
			for l := range L {
				assert.InDeltaSlice(t, want[l][:], st.Layers[l].ExpertTokens, 1e-5, "layer %d", l)
			}
			assert.Nil(t, st.ExpertTokens, "totals carry no per-expert counts")

			b, err := json.Marshal(st)
			require.NoError(t, err)
			var doc map[string]any
			require.NoError(t, json.Unmarshal(b, &doc))
			assert.NotContains(t, doc, "expert_tokens")
			assert.Len(t, doc["layers"].([]any)[0].(map[string]any)["expert_tokens"], E)

			require.NoError(t, e.ResetStats())
			st, err = e.Stats()
			require.NoError(t, err)
			for l := range L {
				assert.Equal(t, make([]float64, E), st.Layers[l].ExpertTokens, "layer %d after reset", l)
			}
		})
	}
}

// kernelLayer runs one layer through the executor on the kernel path
// (the routing in host memory, mapped mode off), as the hook does for a
// prefill or a graph-free decode step.
func kernelLayer(t *testing.T, e *Engine, c FFNCall, reqs []uint64, topk []int64) {
	t.Helper()
	r, err := e.Layer(LayerArgs{FFNCall: c, Reqs: reqs, TopKHost: topk, Flags: LayerNoMapped})
	require.NoError(t, err)
	require.Equal(t, PathKernels, r.Path)
}
