package sim

import (
	"fmt"
	"math/bits"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/cache"
)

// cyclic returns a trace of one expert per layer: tokens tokens of one
// request walk layers 0..layers-1, so the same layers keys repeat cyclically.
func cyclic(layers, tokens int) *Trace {
	toks := make([][][]int32, tokens)
	for i := range toks {
		toks[i] = make([][]int32, layers)
		for l := range toks[i] {
			toks[i][l] = []int32{0}
		}
	}
	return recorded(layers, 1, toks)
}

// cyclicOptimum is the optimal number of hits of a cache of k slots on
// passes passes over a cycle of n > k keys, starting empty: the first pass
// only misses; after it, every n-1 passes contain k-1 passes with k hits
// and n-k passes with k-1 hits (the optimum keeps k-1 keys across each
// pass and, once every n-1 passes, can keep all k). Over many passes the
// hit ratio tends to (k-1)/(n-1). Cross-checked against the exhaustive
// search below.
func cyclicOptimum(n, k, passes int) uint64 {
	if passes <= 1 {
		return 0
	}
	p := passes - 1
	full, rem := p/(n-1), p%(n-1)
	kHitPasses := full*(k-1) + min(rem, k-1)
	return uint64(p*(k-1) + kHitPasses)
}

// exhaustiveOptimum returns the best hits of any demand-paging cache of
// slots slots on t (groups must be resident together), by dynamic
// programming over every reachable set of resident keys. Only for traces
// of at most 16 keys.
func exhaustiveOptimum(t *Trace, slots int) uint64 {
	best := map[uint32]uint64{0: 0}
	for _, req := range t.Requests {
		for _, tok := range req.Tokens {
			for l, grp := range tok {
				var g uint32
				for _, x := range grp {
					g |= 1 << (l*t.Experts + int(x))
				}
				nextBest := map[uint32]uint64{}
				for s, h := range best {
					h += uint64(bits.OnesCount32(s & g))
					over := bits.OnesCount32(s|g) - slots
					others := s &^ g
					// Drop every subset of others of size over (none if over <= 0).
					for sub := others; ; sub = (sub - 1) & others {
						if bits.OnesCount32(sub) == max(over, 0) {
							ns := (s | g) &^ sub
							if h > nextBest[ns] || !has(nextBest, ns) {
								nextBest[ns] = h
							}
						}
						if sub == 0 {
							break
						}
					}
				}
				best = nextBest
			}
		}
	}
	var out uint64
	for _, h := range best {
		out = max(out, h)
	}
	return out
}

func has(m map[uint32]uint64, k uint32) bool { _, ok := m[k]; return ok }

func TestBeladyMatchesTheKnownOptimumOnCyclicTraces(t *testing.T) {
	for _, tc := range []struct{ layers, slots, passes int }{
		{3, 2, 1}, {3, 2, 2}, {3, 2, 7}, {5, 3, 9}, {8, 4, 20}, {6, 5, 13}, {32, 8, 64}, {48, 16, 100},
	} {
		t.Run(fmt.Sprintf("n=%d k=%d passes=%d", tc.layers, tc.slots, tc.passes), func(t *testing.T) {
			tr := cyclic(tc.layers, tc.passes)
			hits, acc := Belady(tr, tc.slots)
			assert.Equal(t, uint64(tc.layers*tc.passes), acc)
			assert.Equal(t, cyclicOptimum(tc.layers, tc.slots, tc.passes), hits)
			if tc.passes == 2 {
				assert.Equal(t, uint64(tc.slots), hits, "a second pass hits exactly k keys")
			}
			if tc.layers <= 8 {
				assert.Equal(t, exhaustiveOptimum(tr, tc.slots), hits)
			}
		})
	}
}

func TestBeladyMatchesExhaustiveSearchOnTinyTraces(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for i := range 60 {
		p := GenParams{
			Layers: 1 + rng.IntN(3), Experts: 2 + rng.IntN(3), TopK: 1 + rng.IntN(2),
			Requests: 1 + rng.IntN(3), TokensPerRequest: 1 + rng.IntN(4),
			Clusters: 1 + rng.IntN(2), Skew: rng.Float64() * 2, Seed: int64(i),
		}
		tr, err := Generate(p)
		require.NoError(t, err)
		for slots := p.TopK; slots <= p.Layers*p.Experts; slots++ {
			hits, _ := Belady(tr, slots)
			require.Equal(t, exhaustiveOptimum(tr, slots), hits, "%s, %d slots", tr.Label, slots)
		}
	}
}

func TestBeladyBoundsEveryPolicyWithoutPrefetch(t *testing.T) {
	for seed := range int64(4) {
		p := GenParams{Layers: 8, Experts: 8, TopK: 2, Requests: 6, TokensPerRequest: 8, Clusters: 1 + int(seed)%3, Skew: 0.5 * float64(seed), Seed: seed}
		tr, err := Generate(p)
		require.NoError(t, err)
		for _, frac := range []float64{0.1, 0.25, 0.5, 0.75} {
			slots := SlotsForFraction(p.Layers, p.Experts, frac)
			opt, acc := Belady(tr, slots)
			for _, pol := range []cache.Policy{cache.PolicyPriority, cache.PolicyLRU, cache.PolicyLFU} {
				r, err := Replay(tr, ReplayConfig{Slots: slots, Policy: pol})
				require.NoError(t, err)
				assert.Equal(t, acc, r.Accesses)
				assert.GreaterOrEqual(t, opt, r.Hits, "%s: %s with %d slots beats Belady", tr.Label, pol, slots)
			}
		}
	}
}

func TestBeladyHitsEveryReuseWhenEverythingFits(t *testing.T) {
	tr, err := Generate(GenParams{Layers: 5, Experts: 6, TopK: 3, Requests: 4, TokensPerRequest: 5, Clusters: 2, Skew: 1, Seed: 9})
	require.NoError(t, err)
	for _, slots := range []int{30, 31, 100} {
		hits, acc := Belady(tr, slots)
		assert.Equal(t, acc-uint64(tr.DistinctKeys()), hits, "only first uses miss")
	}
}

func TestBeladyOnUnreplayableInput(t *testing.T) {
	hits, acc := Belady(nil, 4)
	assert.Zero(t, hits)
	assert.Zero(t, acc)

	tr := cyclic(4, 3)
	hits, acc = Belady(tr, 0)
	assert.Zero(t, hits)
	assert.Equal(t, uint64(12), acc)

	wide := recorded(1, 3, [][][]int32{{{0, 1, 2}}})
	hits, acc = Belady(wide, 2)
	assert.Zero(t, hits, "a group larger than the cache cannot be replayed")
	assert.Equal(t, uint64(3), acc)

	bad := recorded(1, 1, [][][]int32{{{3}}})
	hits, acc = Belady(bad, 2)
	assert.Zero(t, hits)
	assert.Equal(t, uint64(1), acc)
}

func TestBeladyScalesToMillionsOfAccesses(t *testing.T) {
	if testing.Short() {
		t.Skip("large trace")
	}
	// 2 Mi accesses in about a second (more under -race).
	tr, err := Generate(GenParams{Layers: 32, Experts: 64, TopK: 4, Requests: 64, TokensPerRequest: 256, Clusters: 4, Skew: 1, Seed: 1})
	require.NoError(t, err)
	hits, acc := Belady(tr, 512)
	assert.Equal(t, uint64(1<<21), acc)
	assert.Greater(t, hits, uint64(0))
}
