package sim

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestCompareRunsEveryPolicyWithAndWithoutPrefetchAndBelady(t *testing.T) {
	tr, err := Generate(GenParams{Layers: 8, Experts: 8, TopK: 2, Requests: 6, TokensPerRequest: 6, Clusters: 2, Skew: 1, Seed: 2})
	require.NoError(t, err)
	res, err := Compare(tr, 16)
	require.NoError(t, err)
	want := []struct {
		policy   string
		prefetch bool
	}{{"priority", false}, {"priority", true}, {"lru", false}, {"lru", true}, {"lfu", false}, {"lfu", true}, {BeladyPolicy, false}}
	require.Len(t, res, len(want))
	opt := res[len(res)-1]
	for i, w := range want {
		assert.Equal(t, w.policy, res[i].Policy, "row %d", i)
		assert.Equal(t, w.prefetch, res[i].Prefetch, "row %d", i)
		assert.Equal(t, tr.Label, res[i].Label)
		assert.Equal(t, 16, res[i].Slots)
		assert.Equal(t, tr.Accesses(), res[i].Accesses)
		if !w.prefetch {
			assert.LessOrEqual(t, res[i].Hits, opt.Hits, "Belady bounds %s without prefetch", w.policy)
		}
	}
	hits, _ := Belady(tr, 16)
	assert.Equal(t, hits, opt.Hits)
	assert.Equal(t, opt.Accesses-opt.Hits, opt.Misses)

	// The same rows replayed one at a time.
	r, err := Replay(tr, ReplayConfig{Slots: 16, Policy: 1, Prefetch: true})
	require.NoError(t, err)
	assert.Equal(t, r, res[3])
}

func TestCompareRejectsBadInput(t *testing.T) {
	tr, err := Generate(small())
	require.NoError(t, err)
	_, err = Compare(tr, 1)
	assert.ErrorContains(t, err, "1 slots cannot hold one layer's 2 experts")
	_, err = Compare(nil, 4)
	assert.ErrorContains(t, err, "nil trace")
	_, err = CompareWith(tr, ReplayConfig{Slots: 4, Matches: -1})
	assert.ErrorContains(t, err, "matches must be >= 0")
	_, err = CompareWith(tr, ReplayConfig{Slots: 4, EAMCCapacity: 1 << 28})
	assert.ErrorContains(t, err, "exceeds", "a replay's failure is reported")
}

func TestParseFractions(t *testing.T) {
	tests := []struct {
		in   string
		want []float64
		err  string
	}{
		{"0.25,0.5,0.75", []float64{0.25, 0.5, 0.75}, ""},
		{" 1 , 0.1", []float64{1, 0.1}, ""},
		{"", nil, `cache fraction "" is not a number in (0, 1]`},
		{"0.5,", nil, `cache fraction ""`},
		{"0", nil, `"0" is not a number in (0, 1]`},
		{"1.5", nil, `"1.5"`},
		{"half", nil, `"half"`},
		{"NaN", nil, `"NaN"`},
	}
	for _, tc := range tests {
		t.Run(tc.in, func(t *testing.T) {
			got, err := ParseFractions(tc.in)
			if tc.err != "" {
				assert.ErrorContains(t, err, tc.err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
		})
	}
}

func TestSlotsForFraction(t *testing.T) {
	tests := []struct {
		layers, experts int
		frac            float64
		want            int
	}{
		{32, 8, 0.25, 64}, {32, 8, 0.5, 128}, {32, 8, 1, 256}, {48, 128, 0.25, 1536}, {3, 3, 0.1, 1}, {3, 3, 0.01, 1}, {10, 1, 0.25, 3},
	}
	for _, tc := range tests {
		assert.Equal(t, tc.want, SlotsForFraction(tc.layers, tc.experts, tc.frac), "%+v", tc)
	}
}

func TestSweepTabulatesEveryFraction(t *testing.T) {
	p := GenParams{Layers: 8, Experts: 4, TopK: 2, Requests: 4, TokensPerRequest: 4, Clusters: 2, Skew: 1, Seed: 1}
	tr, err := Generate(p)
	require.NoError(t, err)
	rep, err := Sweep(tr, []float64{0.25, 0.5}, ReplayConfig{})
	require.NoError(t, err)
	assert.Equal(t, tr.Label, rep.Label)
	assert.Equal(t, &p, rep.Params)
	assert.Equal(t, tr.Accesses(), rep.Accesses)
	assert.Equal(t, tr.DistinctKeys(), rep.DistinctExperts)
	require.Len(t, rep.Runs, 2)
	assert.Equal(t, 8, rep.Runs[0].Slots)
	assert.Equal(t, 16, rep.Runs[1].Slots)
	for _, run := range rep.Runs {
		assert.Len(t, run.Results, 7)
	}

	var tab bytes.Buffer
	require.NoError(t, rep.WriteTable(&tab))
	out := tab.String()
	assert.True(t, strings.HasPrefix(out, "trace: generated: L=8 E=4 k=2"))
	assert.Contains(t, out, "hit rate")
	assert.Equal(t, 2, strings.Count(out, BeladyPolicy))
	assert.Equal(t, 4, strings.Count(out, " priority "))
	assert.Regexp(t, `25%\s+8\s+lru\s+on`, out)
	assert.Regexp(t, `50%\s+16\s+belady-optimal\s+off`, out)

	var js bytes.Buffer
	require.NoError(t, rep.WriteJSON(&js))
	var back Report
	require.NoError(t, json.Unmarshal(js.Bytes(), &back))
	assert.Equal(t, *rep, back)
	assert.Contains(t, js.String(), `"label": "generated: L=8 E=4 k=2`)
	assert.Contains(t, js.String(), `"skew": 1`)
	assert.Contains(t, js.String(), `"hit_rate"`)
}

func TestSweepRejectsBadInput(t *testing.T) {
	tr, err := Generate(small())
	require.NoError(t, err)
	_, err = Sweep(tr, nil, ReplayConfig{})
	assert.ErrorContains(t, err, "no cache fractions")
	_, err = Sweep(tr, []float64{0.01}, ReplayConfig{})
	assert.ErrorContains(t, err, "cache fraction 0.01 (1 slots)")
	_, err = Sweep(&Trace{}, []float64{0.5}, ReplayConfig{})
	assert.Error(t, err)
}

type failWriter struct{}

func (failWriter) Write([]byte) (int, error) { return 0, assert.AnError }

func TestReportWritersReportWriteErrors(t *testing.T) {
	rep := &Report{Label: "x", Runs: []Run{{CacheFrac: 1, Slots: 1, Results: []Result{{Policy: "lru"}}}}}
	assert.ErrorIs(t, rep.WriteTable(failWriter{}), assert.AnError)
	assert.ErrorIs(t, rep.WriteJSON(failWriter{}), assert.AnError)
}
