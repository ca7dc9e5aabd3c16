package sim

import (
	"errors"
	"fmt"
	"math"
)

// Trace is a sequence of requests replayed in order. Every token of every
// request routes, in every one of the Layers MoE layers, to a set of
// distinct expert ids in [0, Experts).
type Trace struct {
	// Label describes where the trace comes from. Generated traces are
	// labelled "generated: ..." followed by their parameters.
	Label string `json:"label"`
	// Params are the generation parameters, or nil for a recorded trace.
	Params *GenParams `json:"params,omitempty"`
	// Layers is the number of MoE layers.
	Layers int `json:"layers"`
	// Experts is the number of routed experts per layer.
	Experts int `json:"experts"`
	// Requests are replayed in order, one at a time.
	Requests []Request `json:"-"`
}

// Request is one sequence of tokens (prefill and decode tokens alike).
type Request struct {
	// Cluster is the request's cluster for generated traces (which set of
	// preferred experts it draws from); informational for recorded traces.
	Cluster int `json:"cluster"`
	// Tokens[token][layer] lists the distinct expert ids the token was
	// routed to in that layer (TopK of them for generated traces).
	Tokens [][][]int32 `json:"tokens"`
}

// Validate checks that t is non-nil, has at least one layer and expert, and
// that every token has one expert list per layer holding distinct ids in
// [0, Experts). It names the first offending request, token and layer.
func (t *Trace) Validate() error {
	if t == nil {
		return errors.New("sim: nil trace")
	}
	if t.Layers < 1 || t.Experts < 1 {
		return fmt.Errorf("sim: trace %q has %d layers x %d experts; both must be >= 1", t.Label, t.Layers, t.Experts)
	}
	if t.Layers > math.MaxInt32 || t.Experts > math.MaxInt32 || t.Layers > math.MaxInt/t.Experts {
		return fmt.Errorf("sim: trace %q of %d layers x %d experts is too large", t.Label, t.Layers, t.Experts)
	}
	seen := make([]int, t.Experts) // seen[x] = stamp of the last group that used x
	stamp := 0
	for r, req := range t.Requests {
		for i, tok := range req.Tokens {
			if len(tok) != t.Layers {
				return fmt.Errorf("sim: request %d token %d has %d layers, want %d", r, i, len(tok), t.Layers)
			}
			for l, group := range tok {
				stamp++
				for _, x := range group {
					if x < 0 || int(x) >= t.Experts {
						return fmt.Errorf("sim: request %d token %d layer %d: expert %d outside [0, %d)", r, i, l, x, t.Experts)
					}
					if seen[x] == stamp {
						return fmt.Errorf("sim: request %d token %d layer %d: expert %d listed twice", r, i, l, x)
					}
					seen[x] = stamp
				}
			}
		}
	}
	return nil
}

// MaxGroup returns the largest number of experts one token uses in one
// layer (TopK for generated traces): the fewest slots a cache needs to
// replay t.
func (t *Trace) MaxGroup() int {
	m := 0
	for _, req := range t.Requests {
		for _, tok := range req.Tokens {
			for _, g := range tok {
				m = max(m, len(g))
			}
		}
	}
	return m
}

// Accesses returns the number of expert uses in t: one per expert per layer
// per token.
func (t *Trace) Accesses() uint64 {
	var n uint64
	for _, req := range t.Requests {
		for _, tok := range req.Tokens {
			for _, g := range tok {
				n += uint64(len(g))
			}
		}
	}
	return n
}

// DistinctKeys returns the number of distinct (layer, expert) pairs t uses.
func (t *Trace) DistinctKeys() int {
	used := make([]bool, t.Layers*t.Experts)
	n := 0
	for _, req := range t.Requests {
		for _, tok := range req.Tokens {
			for l, g := range tok {
				for _, x := range g {
					if i := l*t.Experts + int(x); !used[i] {
						used[i] = true
						n++
					}
				}
			}
		}
	}
	return n
}
