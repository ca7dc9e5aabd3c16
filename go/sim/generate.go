package sim

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"strconv"
	"strings"
)

// MaxAccesses bounds the size of a generated trace:
// Requests*TokensPerRequest*Layers*TopK expert uses (32 Mi, 128 MiB of ids).
const MaxAccesses = 1 << 25

// GenParams are the parameters of a generated (synthetic) trace.
//
// The model: requests belong to Clusters clusters, assigned round-robin
// (request i belongs to cluster i mod Clusters). Every cluster has, for
// every layer, its own uniformly random permutation of the layer's experts;
// rank r (0-based) of that permutation has popularity weight 1/(r+1)^Skew.
// Each token of a request, in each layer, picks TopK distinct experts by
// weighted sampling without replacement from its cluster's weights for that
// layer. Requests of one cluster thus share preferred experts layer by
// layer, and different clusters prefer different experts.
type GenParams struct {
	// Layers is the number of MoE layers (>= 1).
	Layers int `json:"layers"`
	// Experts is the number of experts per layer (>= TopK).
	Experts int `json:"experts"`
	// TopK is the number of distinct experts each token uses per layer
	// (>= 1).
	TopK int `json:"topk"`
	// Requests is the number of requests (>= 1).
	Requests int `json:"requests"`
	// TokensPerRequest is the number of tokens of every request (>= 1).
	TokensPerRequest int `json:"tokens_per_request"`
	// Clusters is the number of request clusters (>= 1).
	Clusters int `json:"clusters"`
	// Skew is the Zipf-like exponent of expert popularity within a
	// cluster: 0 is uniform, larger values concentrate a cluster's tokens
	// on fewer experts. Finite and >= 0.
	Skew float64 `json:"skew"`
	// Seed seeds the generator: equal parameters give equal traces.
	Seed int64 `json:"seed"`
}

// Validate reports every invalid parameter of p (joined), or nil.
func (p GenParams) Validate() error {
	var errs []error
	atLeast1 := func(name string, v int) {
		if v < 1 {
			errs = append(errs, fmt.Errorf("sim: %s must be >= 1 (got %d)", name, v))
		}
	}
	atLeast1("layers", p.Layers)
	atLeast1("experts", p.Experts)
	atLeast1("topk", p.TopK)
	atLeast1("requests", p.Requests)
	atLeast1("tokens per request", p.TokensPerRequest)
	atLeast1("clusters", p.Clusters)
	if p.Experts >= 1 && p.TopK > p.Experts {
		errs = append(errs, fmt.Errorf("sim: topk %d exceeds the %d experts per layer", p.TopK, p.Experts))
	}
	if p.Experts > math.MaxInt32 {
		errs = append(errs, fmt.Errorf("sim: %d experts per layer do not fit int32 ids", p.Experts))
	}
	if math.IsNaN(p.Skew) || math.IsInf(p.Skew, 0) || p.Skew < 0 {
		errs = append(errs, fmt.Errorf("sim: skew must be finite and >= 0 (got %v)", p.Skew))
	}
	if len(errs) == 0 {
		n := float64(p.Requests) * float64(p.TokensPerRequest) * float64(p.Layers) * float64(p.TopK)
		if n > MaxAccesses {
			errs = append(errs, fmt.Errorf("sim: %d requests x %d tokens x %d layers x topk %d = %.0f expert uses exceeds the limit of %d",
				p.Requests, p.TokensPerRequest, p.Layers, p.TopK, n, MaxAccesses))
		}
		// Every cluster holds one permutation per layer.
		if float64(p.Clusters)*float64(p.Layers)*float64(p.Experts) > MaxAccesses {
			errs = append(errs, fmt.Errorf("sim: %d clusters x %d layers x %d experts of permutations exceeds the limit of %d",
				p.Clusters, p.Layers, p.Experts, MaxAccesses))
		}
	}
	return errors.Join(errs...)
}

// Label returns the trace label Generate gives p, for example
// "generated: L=32 E=8 k=2 requests=60 tokens=64 clusters=4 skew=1.0 seed=1".
func (p GenParams) Label() string {
	skew := strconv.FormatFloat(p.Skew, 'f', -1, 64)
	if !strings.ContainsAny(skew, ".eEn") {
		skew += ".0"
	}
	return fmt.Sprintf("generated: L=%d E=%d k=%d requests=%d tokens=%d clusters=%d skew=%s seed=%d",
		p.Layers, p.Experts, p.TopK, p.Requests, p.TokensPerRequest, p.Clusters, skew, p.Seed)
}

// Generate builds a synthetic trace from p (see GenParams for the model).
// It validates p first; equal parameters (including Seed) give identical
// traces.
func Generate(p GenParams) (*Trace, error) {
	if err := p.Validate(); err != nil {
		return nil, err
	}
	rng := rand.New(rand.NewPCG(uint64(p.Seed), 0x9e3779b97f4a7c15))
	L, E, K := p.Layers, p.Experts, p.TopK

	// perm[c][l*E+r] is the expert of rank r in layer l for cluster c.
	perm := make([][]int32, p.Clusters)
	for c := range perm {
		perm[c] = make([]int32, L*E)
		for l := 0; l < L; l++ {
			row := perm[c][l*E : (l+1)*E]
			for r, x := range rng.Perm(E) {
				row[r] = int32(x)
			}
		}
	}
	// invW[r] = 1/weight(r) = (r+1)^Skew.
	invW := make([]float64, E)
	for r := range invW {
		invW[r] = math.Pow(float64(r+1), p.Skew)
	}

	t := &Trace{Label: p.Label(), Params: &p, Layers: L, Experts: E, Requests: make([]Request, p.Requests)}
	ranks := make([]int, 0, K)
	keys := make([]float64, 0, K)
	for i := range t.Requests {
		c := i % p.Clusters
		ids := make([]int32, p.TokensPerRequest*L*K) // one backing array per request
		req := Request{Cluster: c, Tokens: make([][][]int32, p.TokensPerRequest)}
		for tok := range req.Tokens {
			groups := make([][]int32, L)
			for l := range groups {
				ranks = sampleTopK(rng, invW, K, ranks[:0], keys[:0])
				g := ids[:K:K]
				ids = ids[K:]
				row := perm[c][l*E : (l+1)*E]
				for j, r := range ranks {
					g[j] = row[r]
				}
				groups[l] = g
			}
			req.Tokens[tok] = groups
		}
		t.Requests[i] = req
	}
	return t, nil
}

// sampleTopK draws k distinct ranks with probability proportional to
// 1/invW[r], without replacement (Efraimidis–Spirakis: each rank gets the
// key Exp(1)·invW[r] and the k smallest keys win), in increasing key order.
// ranks and keys are scratch buffers of length 0.
func sampleTopK(rng *rand.Rand, invW []float64, k int, ranks []int, keys []float64) []int {
	for r, iw := range invW {
		key := rng.ExpFloat64() * iw
		if len(ranks) == k && key >= keys[k-1] {
			continue
		}
		// Insert (key, r) in order, dropping the worst when full.
		if len(ranks) < k {
			ranks = append(ranks, 0)
			keys = append(keys, 0)
		}
		j := len(ranks) - 1
		for j > 0 && keys[j-1] > key {
			keys[j], ranks[j] = keys[j-1], ranks[j-1]
			j--
		}
		keys[j], ranks[j] = key, r
	}
	return ranks
}
