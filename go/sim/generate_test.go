package sim

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// small returns valid generation parameters for a quick trace.
func small() GenParams {
	return GenParams{Layers: 6, Experts: 8, TopK: 2, Requests: 5, TokensPerRequest: 4, Clusters: 2, Skew: 1, Seed: 7}
}

func TestGenerateIsDeterministicPerSeed(t *testing.T) {
	for _, p := range []GenParams{small(), {Layers: 3, Experts: 64, TopK: 8, Requests: 3, TokensPerRequest: 5, Clusters: 3, Skew: 0, Seed: -4}} {
		a, err := Generate(p)
		require.NoError(t, err)
		b, err := Generate(p)
		require.NoError(t, err)
		assert.Equal(t, a, b, "same parameters, same trace")

		q := p
		q.Seed++
		c, err := Generate(q)
		require.NoError(t, err)
		assert.NotEqual(t, a.Requests, c.Requests, "another seed gives another trace")
	}
}

func TestGenerateRejectsBadParams(t *testing.T) {
	tests := []struct {
		name   string
		modify func(*GenParams)
		want   string
	}{
		{"no layers", func(p *GenParams) { p.Layers = 0 }, "layers must be >= 1 (got 0)"},
		{"no experts", func(p *GenParams) { p.Experts = -1 }, "experts must be >= 1 (got -1)"},
		{"no topk", func(p *GenParams) { p.TopK = 0 }, "topk must be >= 1 (got 0)"},
		{"topk above experts", func(p *GenParams) { p.TopK = 9 }, "topk 9 exceeds the 8 experts per layer"},
		{"no requests", func(p *GenParams) { p.Requests = 0 }, "requests must be >= 1"},
		{"no tokens", func(p *GenParams) { p.TokensPerRequest = 0 }, "tokens per request must be >= 1"},
		{"no clusters", func(p *GenParams) { p.Clusters = 0 }, "clusters must be >= 1"},
		{"negative skew", func(p *GenParams) { p.Skew = -0.5 }, "skew must be finite and >= 0 (got -0.5)"},
		{"NaN skew", func(p *GenParams) { p.Skew = nan() }, "skew must be finite"},
		{"too many ids", func(p *GenParams) { p.Requests, p.TokensPerRequest = 1<<20, 1<<10 }, "exceeds the limit"},
		{"too many permutations", func(p *GenParams) { p.Clusters, p.Layers, p.Experts = 1<<16, 1<<6, 1<<8 }, "permutations exceeds the limit"},
		{"ids beyond int32", func(p *GenParams) { p.Experts = 1 << 32 }, "do not fit int32"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := small()
			tc.modify(&p)
			tr, err := Generate(p)
			require.Error(t, err)
			assert.Nil(t, tr)
			assert.Contains(t, err.Error(), tc.want)
		})
	}
	t.Run("every problem is reported", func(t *testing.T) {
		_, err := Generate(GenParams{})
		require.Error(t, err)
		for _, s := range []string{"layers", "experts", "topk", "requests", "tokens per request", "clusters"} {
			assert.Contains(t, err.Error(), s+" must be >= 1")
		}
	})
}

func TestGenerateProducesTopKDistinctValidIDs(t *testing.T) {
	tests := []GenParams{
		small(),
		{Layers: 4, Experts: 5, TopK: 5, Requests: 3, TokensPerRequest: 3, Clusters: 1, Skew: 2, Seed: 1},   // k = E
		{Layers: 2, Experts: 128, TopK: 8, Requests: 4, TokensPerRequest: 6, Clusters: 3, Skew: 0, Seed: 2}, // uniform
		{Layers: 2, Experts: 16, TopK: 4, Requests: 4, TokensPerRequest: 6, Clusters: 5, Skew: 6, Seed: 3},  // very skewed
		{Layers: 1, Experts: 1, TopK: 1, Requests: 1, TokensPerRequest: 1, Clusters: 1, Skew: 1, Seed: 0},
	}
	for _, p := range tests {
		t.Run(p.Label(), func(t *testing.T) {
			tr, err := Generate(p)
			require.NoError(t, err)
			require.NoError(t, tr.Validate(), "ids in range and distinct per token and layer")
			assert.Equal(t, p.Layers, tr.Layers)
			assert.Equal(t, p.Experts, tr.Experts)
			require.NotNil(t, tr.Params)
			assert.Equal(t, p, *tr.Params)
			assert.Equal(t, p.Label(), tr.Label)
			require.Len(t, tr.Requests, p.Requests)
			for i, r := range tr.Requests {
				assert.Equal(t, i%p.Clusters, r.Cluster, "round-robin clusters")
				require.Len(t, r.Tokens, p.TokensPerRequest)
				for _, tok := range r.Tokens {
					require.Len(t, tok, p.Layers)
					for _, g := range tok {
						assert.Len(t, g, p.TopK)
					}
				}
			}
			assert.Equal(t, p.TopK, tr.MaxGroup())
			assert.Equal(t, uint64(p.Requests*p.TokensPerRequest*p.Layers*p.TopK), tr.Accesses())
		})
	}
}

func TestGeneratedLabelNamesTheParameters(t *testing.T) {
	p := GenParams{Layers: 32, Experts: 8, TopK: 2, Requests: 60, TokensPerRequest: 64, Clusters: 4, Skew: 1, Seed: 1}
	assert.Equal(t, "generated: L=32 E=8 k=2 requests=60 tokens=64 clusters=4 skew=1.0 seed=1", p.Label())
	p.Skew = 0.25
	assert.Contains(t, p.Label(), "skew=0.25 ")
}

// topShare returns the average, over clusters and layers, of the share of
// accesses that went to the most used expert.
func topShare(tr *Trace, clusters int) float64 {
	var sum float64
	for c := 0; c < clusters; c++ {
		for l := 0; l < tr.Layers; l++ {
			counts := make([]int, tr.Experts)
			total := 0
			for _, r := range tr.Requests {
				if r.Cluster != c {
					continue
				}
				for _, tok := range r.Tokens {
					for _, x := range tok[l] {
						counts[x]++
						total++
					}
				}
			}
			top := 0
			for _, n := range counts {
				top = max(top, n)
			}
			sum += float64(top) / float64(total)
		}
	}
	return sum / float64(clusters*tr.Layers)
}

func TestHigherSkewConcentratesAccesses(t *testing.T) {
	prev := 0.0
	for _, skew := range []float64{0, 0.5, 1, 2, 4} {
		p := GenParams{Layers: 4, Experts: 32, TopK: 1, Requests: 8, TokensPerRequest: 200, Clusters: 2, Skew: skew, Seed: 11}
		tr, err := Generate(p)
		require.NoError(t, err)
		share := topShare(tr, p.Clusters)
		t.Logf("skew %.1f: top expert share %.3f", skew, share)
		assert.Greater(t, share, prev, "skew %v concentrates more than the previous skew", skew)
		prev = share
	}
	// Zipf(4) over 32 experts puts 1/ζ(4) ≈ 92% of a cluster's tokens on
	// its top expert; uniform puts about 1/32 (plus sampling noise).
	assert.InDelta(t, 0.92, prev, 0.04)
}

func TestClustersPreferDifferentExperts(t *testing.T) {
	p := GenParams{Layers: 8, Experts: 64, TopK: 1, Requests: 2, TokensPerRequest: 100, Clusters: 2, Skew: 4, Seed: 5}
	tr, err := Generate(p)
	require.NoError(t, err)
	same := 0
	for l := 0; l < p.Layers; l++ {
		if mode(tr.Requests[0], l) == mode(tr.Requests[1], l) {
			same++
		}
	}
	// Independent random permutations agree on the top expert with
	// probability 1/64 per layer.
	assert.LessOrEqual(t, same, 1)
}

// mode returns the most used expert of layer l in r.
func mode(r Request, l int) int32 {
	counts := map[int32]int{}
	var best int32
	for _, tok := range r.Tokens {
		for _, x := range tok[l] {
			counts[x]++
			if counts[x] > counts[best] {
				best = x
			}
		}
	}
	return best
}
