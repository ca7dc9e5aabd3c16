package sim

import (
	"math"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func nan() float64 { return math.NaN() }

// recorded builds a recorded trace (Params nil) of layers x experts from
// requests given as [token][layer] expert lists.
func recorded(layers, experts int, reqs ...[][][]int32) *Trace {
	t := &Trace{Label: "recorded: test", Layers: layers, Experts: experts}
	for _, r := range reqs {
		t.Requests = append(t.Requests, Request{Tokens: r})
	}
	return t
}

func TestTraceValidateRejectsMalformedTraces(t *testing.T) {
	tests := []struct {
		name string
		tr   *Trace
		want string
	}{
		{"nil", nil, "nil trace"},
		{"no layers", &Trace{Experts: 2}, "0 layers x 2 experts"},
		{"no experts", &Trace{Layers: 2}, "2 layers x 0 experts"},
		{"huge", &Trace{Layers: math.MaxInt32 + 1, Experts: 1}, "too large"},
		{"missing layer", recorded(2, 2, [][][]int32{{{0}}}), "request 0 token 0 has 1 layers, want 2"},
		{"expert too large", recorded(1, 2, [][][]int32{{{0}}}, [][][]int32{{{2}}}), "request 1 token 0 layer 0: expert 2 outside [0, 2)"},
		{"negative expert", recorded(1, 2, [][][]int32{{{-1}}}), "expert -1 outside"},
		{"duplicate expert", recorded(2, 3, [][][]int32{{{0}, {1}}, {{2}, {1, 1}}}), "request 0 token 1 layer 1: expert 1 listed twice"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.tr.Validate()
			require.Error(t, err)
			assert.Contains(t, err.Error(), tc.want)
		})
	}
}

func TestTraceCountsAccessesGroupsAndKeys(t *testing.T) {
	tr := recorded(2, 3,
		[][][]int32{{{0, 1}, {2}}, {{1}, {}}},
		[][][]int32{{{2, 0, 1}, {2}}},
	)
	require.NoError(t, tr.Validate(), "an empty group (layer unused) is allowed")
	assert.Equal(t, uint64(8), tr.Accesses())
	assert.Equal(t, 3, tr.MaxGroup())
	assert.Equal(t, 4, tr.DistinctKeys()) // L0/E0, L0/E1, L0/E2, L1/E2
}
