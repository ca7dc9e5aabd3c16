package cache

import (
	"fmt"
	"strings"
)

// Policy selects which unpinned, ready slot to evict.
type Policy uint8

const (
	// PolicyPriority evicts the expert with the lowest activation-aware
	// priority (MoE-Infinity's formula, supplied by a Scorer):
	//   p = (pEAM[l][e] + ε) / n_tokens(l) · (1 − l/L)
	// so experts of early layers, which prefetching helps least, are kept.
	PolicyPriority Policy = iota
	// PolicyLRU evicts the least recently used expert.
	PolicyLRU
	// PolicyLFU evicts the least frequently used expert (uses counted over
	// the cache's lifetime, ties broken by recency).
	PolicyLFU
)

// Policies lists the accepted policy names.
var Policies = []string{"priority", "lru", "lfu"}

// ParsePolicy maps a policy name, spelled exactly as in Policies
// ("priority", "lru", "lfu": lowercase, no surrounding whitespace; "" is
// not a name), to a Policy.
func ParsePolicy(s string) (Policy, error) {
	for i, name := range Policies {
		if s == name {
			return Policy(i), nil
		}
	}
	return 0, fmt.Errorf("unknown cache policy %q (supported: %s)", s, strings.Join(Policies, ", "))
}

// String returns the policy's name as ParsePolicy accepts it.
func (p Policy) String() string {
	if int(p) < len(Policies) {
		return Policies[p]
	}
	return fmt.Sprintf("Policy(%d)", uint8(p))
}

// Scorer supplies the engine's view of how valuable an expert is.
type Scorer interface {
	// Priority is the eviction priority of k under PolicyPriority: the
	// expert with the lowest value is evicted first. Dimensionless, >= 0.
	Priority(k Key) float64
	// Predicted is how strongly the prefetcher currently expects k to be
	// needed soon (0 when not predicted). Prefetches never evict an expert
	// predicted at least as strongly as the one they bring in.
	Predicted(k Key) float64
}

// uniformScorer is used when the engine supplies none: every expert scores
// by layer alone, so PolicyPriority degrades to "keep early layers".
type uniformScorer struct{ layers int }

func (u uniformScorer) Priority(k Key) float64 {
	if u.layers <= 0 {
		return 1
	}
	return 1 - float64(k.Layer)/float64(u.layers)
}

func (uniformScorer) Predicted(Key) float64 { return 0 }
