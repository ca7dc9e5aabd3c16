package prefetch

import (
	"sort"
	"sync/atomic"

	"github.com/moe-infinity/moe_infinity/go/cache"
	"github.com/moe-infinity/moe_infinity/go/trace"
)

// HintScore is the score of experts named by a router hint ("layer l+1's
// router, run on layer l's hidden state, picks these"). It is above every
// EAM prediction (which lie in [0, 1]) because such hints are very accurate
// for trained models.
const HintScore = 2.0

// Planner predicts which experts later layers will need, from the EAM
// collection. Safe for concurrent use (it only reads the collection).
type Planner struct {
	coll *trace.Collection
	// Matches is the number of most-similar stored EAMs summed (>= 1).
	Matches int
	// MinScore drops candidates predicted below this value.
	MinScore float64
	// MaxCandidates caps the plan's length (0 = no cap).
	MaxCandidates int
	// Horizon is how many layers ahead to plan (0 = all remaining layers).
	Horizon int
	// Confidence drops candidates whose predicted share of their layer's
	// routing (before the proximity weight) is below Confidence/Experts,
	// i.e. below Confidence times a uniform guess. Predictions from a
	// collection whose requests route uniformly (random weights, unseen
	// workloads) then issue no prefetch instead of wasting bandwidth.
	// 0 disables the filter.
	Confidence float64
	// MinEvidence drops layers whose prediction rests on fewer routed
	// tokens (summed over the matched EAMs) than this: a share computed
	// from a handful of tokens is noise. 0 disables the filter.
	MinEvidence float64
	// MinTokenShare drops candidates predicted to serve fewer than this
	// fraction of their layer's tokens (share of the routing × top-k),
	// once SetTopK has told the planner k. With few experts it is no
	// stricter than Confidence (8 experts, top-2: both mean a quarter of
	// the routing); with many small ones (128, top-8) it stops weak
	// predictions that cost more link traffic than they save
	// (BENCHMARKS.md). 0 disables the filter.
	MinTokenShare float64

	topK atomic.Int64
}

// DefaultMinTokenShare is the default Planner.MinTokenShare: prefetch an
// expert only when the matched requests used it for at least half of
// their tokens at that layer.
const DefaultMinTokenShare = 0.5

// Tune applies the engine's settings of the filters Confidence,
// MinEvidence and MinTokenShare, each the same way: 0 keeps the planner's
// value (its default), a negative value turns the filter off, a positive
// one replaces it.
func (p *Planner) Tune(confidence, minEvidence, minTokenShare float64) {
	set := func(dst *float64, v float64) {
		switch {
		case v > 0:
			*dst = v
		case v < 0:
			*dst = 0
		}
	}
	set(&p.Confidence, confidence)
	set(&p.MinEvidence, minEvidence)
	set(&p.MinTokenShare, minTokenShare)
}

// SetTopK tells the planner how many experts each token uses (the
// engine learns it from the first routing it sees); 0 turns the
// MinTokenShare filter off.
func (p *Planner) SetTopK(k int) {
	if p != nil {
		p.topK.Store(int64(max(k, 0)))
	}
}

// DefaultConfidence is the default Planner.Confidence: an expert is
// prefetched only when it is predicted at least twice as likely as a
// uniform guess.
const DefaultConfidence = 2.0

// DefaultMinEvidence is the default Planner.MinEvidence, in routed tokens.
const DefaultMinEvidence = 64

// NewPlanner returns a planner over coll with defaults: 4 matches, minimum
// score 0.01, DefaultConfidence, DefaultMinEvidence, no cap, whole horizon.
func NewPlanner(coll *trace.Collection) *Planner {
	return &Planner{coll: coll, Matches: 4, MinScore: 0.01, Confidence: DefaultConfidence, MinEvidence: DefaultMinEvidence, MinTokenShare: DefaultMinTokenShare}
}

// Plan returns the candidates for the layers after `layer`, best first,
// given the request's partial EAM (layers 0..layer filled). It returns nil
// when the collection has nothing similar.
func (p *Planner) Plan(partial *trace.EAM, layer int) []Candidate {
	if p == nil || p.coll == nil || partial == nil {
		return nil
	}
	k := max(1, p.Matches)
	return p.candidates(p.coll.PredictRaw(partial, layer, k), layer, layer)
}

// PlanNext returns the candidates for every layer of the request's next
// pass (token), best first, matching on its complete partial EAM: the plan
// made once per replayed decode step, whose layers all ran before their
// routing reached the host.
func (p *Planner) PlanNext(partial *trace.EAM) []Candidate {
	if p == nil || p.coll == nil || partial == nil {
		return nil
	}
	return p.candidates(p.coll.PredictRawAll(partial, max(1, p.Matches)), -1, 0)
}

// PlanRequest is Plan for request req of tr, whose partial EAM tr matches
// incrementally (trace.Tracker.PredictRaw) instead of rescanning the
// collection; tr must retire into the planner's collection (else no
// plan). ok is false when req is unknown to tr or has ended.
func (p *Planner) PlanRequest(tr *trace.Tracker, req uint64, layer int) (plan []Candidate, ok bool) {
	if p == nil || p.coll == nil || tr == nil || tr.Collection() != p.coll {
		return nil, true
	}
	raw, err := tr.PredictRaw(req, layer, max(1, p.Matches))
	if err != nil {
		return nil, false
	}
	return p.candidates(raw, layer, layer), true
}

// PlanNextRequest is PlanNext for request req of tr, matched
// incrementally like PlanRequest.
func (p *Planner) PlanNextRequest(tr *trace.Tracker, req uint64) (plan []Candidate, ok bool) {
	if p == nil || p.coll == nil || tr == nil || tr.Collection() != p.coll {
		return nil, true
	}
	raw, err := tr.PredictRawAll(req, max(1, p.Matches))
	if err != nil {
		return nil, false
	}
	return p.candidates(raw, -1, 0), true
}

// candidates filters and scores raw's rows after layer; a row's
// proximity weight is 1 − (row − at)/L, at being the layer the request is
// at (the next pass starts at 0 with weight 1).
func (p *Planner) candidates(raw *trace.EAM, layer, at int) []Candidate {
	if raw == nil {
		return nil
	}
	last := raw.Layers - 1
	if p.Horizon > 0 && layer+p.Horizon < last {
		last = layer + p.Horizon
	}
	var out []Candidate
	uniform := 1 / float64(raw.Experts)
	topK := float64(p.topK.Load())
	for l := layer + 1; l <= last; l++ {
		row := raw.Row(l)
		var total float64
		for _, v := range row {
			total += float64(v)
		}
		if total == 0 || total < p.MinEvidence {
			continue
		}
		proximity := 1 - float64(l-at)/float64(raw.Layers)
		for e, v := range row {
			share := float64(v) / total
			score := share * proximity
			if v <= 0 || score < p.MinScore {
				continue
			}
			if p.Confidence > 0 && share < p.Confidence*uniform {
				continue
			}
			if topK > 0 && share*topK < p.MinTokenShare {
				continue
			}
			out = append(out, Candidate{Key: cache.Key{Layer: int32(l), Expert: int32(e)}, Score: score})
		}
	}
	sort.Slice(out, func(i, j int) bool { return better(out[i], out[j]) })
	if p.MaxCandidates > 0 && len(out) > p.MaxCandidates {
		out = out[:p.MaxCandidates]
	}
	return out
}

// HintCandidates turns a router hint for layer into candidates scored
// HintScore.
func HintCandidates(layer int, experts []int32) []Candidate {
	out := make([]Candidate, 0, len(experts))
	for _, e := range experts {
		out = append(out, Candidate{Key: cache.Key{Layer: int32(layer), Expert: e}, Score: HintScore})
	}
	return out
}
