package sim

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/cache"
)

func TestTraceFileRoundTrip(t *testing.T) {
	tr, err := Generate(GenParams{Layers: 3, Experts: 4, TopK: 2, Requests: 3, TokensPerRequest: 5, Clusters: 2, Skew: 1, Seed: 3})
	require.NoError(t, err)
	var b bytes.Buffer
	require.NoError(t, WriteTrace(&b, tr))
	back, err := ReadTrace(&b)
	require.NoError(t, err)
	assert.Equal(t, tr.Label, back.Label)
	assert.Equal(t, tr.Requests, back.Requests)
	path := filepath.Join(t.TempDir(), "t.json")
	var c bytes.Buffer
	require.NoError(t, WriteTrace(&c, tr))
	require.NoError(t, os.WriteFile(path, c.Bytes(), 0o644))
	fromFile, err := ReadTraceFile(path)
	require.NoError(t, err)
	assert.Equal(t, tr.Accesses(), fromFile.Accesses())
	_, err = ReadTraceFile(filepath.Join(t.TempDir(), "missing.json"))
	require.Error(t, err)
}

func TestReadTraceRejectsBadFiles(t *testing.T) {
	for _, tc := range []struct{ in, msg string }{
		{`{"label": "x", "layers": 1, "experts": 2, "requests": [{"cluster": 0, "tokens": [[[5]]]}]}`, "expert 5 outside"},
		{`{"label": "x", "layers": 0, "experts": 2, "requests": []}`, "both must be >= 1"},
		{`{"label": "x", "bogus": 1}`, `unknown key "bogus" (valid keys: experts, label, layers, params, requests)`},
		{`not json`, "reading trace"},
	} {
		_, err := ReadTrace(strings.NewReader(tc.in))
		require.ErrorContains(t, err, tc.msg)
	}
}

func TestPerRequestHitRates(t *testing.T) {
	tr, err := Generate(GenParams{Layers: 4, Experts: 8, TopK: 2, Requests: 6, TokensPerRequest: 8, Clusters: 1, Skew: 1, Seed: 1})
	require.NoError(t, err)
	res, err := Replay(tr, ReplayConfig{Slots: 8, Policy: cache.PolicyPriority, PerRequest: true})
	require.NoError(t, err)
	require.Len(t, res.RequestHitRates, 6)
	var hits float64
	for _, r := range res.RequestHitRates {
		assert.GreaterOrEqual(t, r, 0.0)
		assert.LessOrEqual(t, r, 1.0)
		hits += r * float64(res.Accesses) / 6
	}
	assert.InDelta(t, float64(res.Hits), hits, 1, "per-request rates average to the total (equal-sized requests)")
}
