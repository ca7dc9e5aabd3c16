//go:build cgo

package engine

import (
	"encoding/binary"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/cache"
	"github.com/moe-infinity/moe_infinity/go/dtype"
)

// tokenRates is a cost model in which a token costs the CPU as much as an
// expert's weights (CPUTokenCost 1), the link and the CPU otherwise
// equally fast: an expert of many tokens crosses the link, one of a
// single token may go to the CPU.
var tokenRates = HybridCosts{LinkGBps: 10, CPUGBps: 10, CPUTokenCost: 1, LinkShare: 1, CPUShare: 1}

// prefillIO is a prefill-sized call of layer 1 (T tokens, K = 2, more
// than KernelWins allows): every token routed to experts 0 and 1, but
// token 5 to 2 and 0 and token few to 3 and 1.
func prefillIO(T, few int) *ffnIO {
	const K, E = 2, 4
	rng := rand.New(rand.NewPCG(5, 6))
	io := newFFNIO(rng, T, K, E)
	for t := 0; t < T; t++ {
		a, b := int64(0), int64(1)
		switch t {
		case 5:
			a, b = 2, 0
		case few:
			a, b = 3, 1
		}
		io.topk[t*K], io.topk[t*K+1] = a, b
		io.weights[t*K], io.weights[t*K+1] = 0.625, 0.375
	}
	return io
}

// callerCompletes is what the caller's code does with a host path's
// result: it computes r.Experts' pairs (the kernels on the oracle's slots
// stand in for transformers' code; pairs of other experts are skipped),
// then adds the partial in float32 before rounding to bfloat16.
func callerCompletes(t *testing.T, oracle *Engine, io *ffnIO, r LayerResult, partial []float32, T, K int) []byte {
	t.Helper()
	part := &ffnIO{x: io.x, out: make([]byte, len(io.out)), scratch: make([]float32, len(io.scratch)), topk: io.topk, weights: io.weights}
	c := part.call(1, T, K)
	c.Experts = r.Experts
	require.NoError(t, oracle.LayerFFN(c))
	if len(r.CPUExperts) == 0 {
		return part.out
	}
	out := make([]byte, len(part.out))
	for i := range partial {
		v := math.Float32frombits(uint32(binary.LittleEndian.Uint16(part.out[2*i:]))<<16) + partial[i]
		binary.LittleEndian.PutUint16(out[2*i:], dtype.F32BitsToBF16(math.Float32bits(v)))
	}
	return out
}

func TestPrefillSendsExpertsOfFewTokensToTheCPU(t *testing.T) {
	const L, E, T, K = 2, 4, 24, 2
	for _, tc := range []struct {
		name       string
		noPartial  bool
		flags      LayerFlags
		act        dtype.DType
		pause      bool
		cpu        []int32 // the experts the CPU computes
		dev        []int32 // those the caller's code computes
		cpuCounted int64
	}{
		{name: "few tokens to the CPU, many to the link", act: dtype.BF16, cpu: []int32{3}, dev: []int32{0, 1, 2}, cpuCounted: 1},
		{name: "no partial offered", noPartial: true, act: dtype.BF16, dev: []int32{0, 1, 2, 3}},
		{name: "routing gaps", flags: LayerRoutingGaps, act: dtype.BF16, dev: []int32{0, 1, 2, 3}},
		{name: "activations of another type", act: dtype.Invalid, dev: []int32{0, 1, 2, 3}},
		{name: "cpu_experts paused", pause: true, act: dtype.BF16, dev: []int32{0, 1, 2, 3}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			require.False(t, KernelWins(T, 4096), "a prefill-sized call")
			e := hybridEngineWith(t, 4, tokenRates, func(e *Engine) { bf16Model(t, e, L, E) })
			if tc.pause {
				require.NoError(t, e.pauseHybrid(true))
			}
			oracle := mappedEngine(t, L, E, 4)
			// Twice, the CPU's token moving: rows the CPU computed for
			// the first call are zero in the second's partial.
			for _, few := range []int{17, 9} {
				io := prefillIO(T, few)
				want := reference(t, oracle, io, 1, T, K)
				require.NoError(t, e.ResetStats())
				req, err := e.BeginRequest()
				require.NoError(t, err)
				partial := make([]float32, T*mH)
				for i := range partial {
					partial[i] = float32(math.NaN()) // written where the CPU takes part, else unread
				}
				a := LayerArgs{FFNCall: io.call(1, T, K), Reqs: []uint64{req}, TopKHost: io.topk, Flags: tc.flags}
				a.DType = tc.act
				if !tc.noPartial {
					a.Partial = addr(partial)
				}
				r, err := e.Layer(a)
				require.NoError(t, err)
				assert.Equal(t, PathHostStream, r.Path)
				assert.Equal(t, tc.dev, r.Experts, "the caller's code computes the others")
				assert.Equal(t, tc.cpu, r.CPUExperts)

				st, err := e.Stats()
				require.NoError(t, err)
				assert.Equal(t, tc.cpuCounted, st.Layers[1].CPUComputed)
				assert.Equal(t, tc.cpuCounted > 0, st.Layers[1].CPUNs > 0)
				assert.Equal(t, tc.cpuCounted > 0, st.Layers[1].MissPlanNs > 0, "the cost model's plan is counted where it ran")
				assert.Equal(t, uint64(len(tc.cpu)), st.Layers[1].Misses, "the CPU's experts are misses; the caller's have not been acquired")
				assert.Equal(t, uint64(len(tc.cpu)), st.Layers[1].Loads, "the CPU's experts, admitted behind the call, are the only loads (the caller's have not been acquired)")
				if tc.cpuCounted > 0 {
					assert.Len(t, e.hybrid.scratch, 1*K*mI, "the CPU's scratch holds its one token's pairs, not the call's")
				}

				// The caller computes the rest: the layer's output equals
				// the call without the CPU within bfloat16 rounding.
				assertBF16Close(t, want, callerCompletes(t, oracle, io, r, partial, T, K))
				// The CPU's experts are offered to the cache: the slots
				// being empty, each is copied in behind the call. Emptied
				// again, so that the second call misses them too.
				for _, x := range tc.cpu {
					waitResident(t, e, cache.Key{Layer: 1, Expert: x})
				}
				e.cache.Flush()
				require.NoError(t, e.EndRequest(req))
			}
		})
	}
}
