package sim

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/cache"
)

func TestMeasureRecoveryAfterAClusterSwitch(t *testing.T) {
	a, err := Generate(GenParams{Layers: 8, Experts: 16, TopK: 2, Requests: 12, TokensPerRequest: 24, Clusters: 1, Skew: 2, Seed: 1})
	require.NoError(t, err)
	b, err := Generate(GenParams{Layers: 8, Experts: 16, TopK: 2, Requests: 12, TokensPerRequest: 24, Clusters: 1, Skew: 2, Seed: 2})
	require.NoError(t, err)
	tr := &Trace{Label: "switch", Layers: 8, Experts: 16, Requests: append(append([]Request{}, a.Requests...), b.Requests...)}
	r, err := MeasureRecovery(tr, ReplayConfig{Slots: 32, Policy: cache.PolicyPriority}, 12, 4, 0.05)
	require.NoError(t, err)
	assert.Len(t, r.WithPrefetch, 24)
	assert.Len(t, r.WithoutPrefetch, 24)
	assert.GreaterOrEqual(t, r.Requests, 1)
	assert.LessOrEqual(t, r.Requests, 12)
	assert.Greater(t, r.Steady, 0.0)
	for _, bad := range []struct{ at, window int }{{0, 1}, {24, 1}, {12, 0}, {12, 13}} {
		_, err := MeasureRecovery(tr, ReplayConfig{Slots: 32}, bad.at, bad.window, 0.05)
		require.Error(t, err, "%+v", bad)
	}
}
