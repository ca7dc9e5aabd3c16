package prefetch

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/cache"
	"github.com/moe-infinity/moe_infinity/go/trace"
)

// eam builds an EAM with one token routed to experts[l] in layer l.
func eam(experts, layers int, route ...int) *trace.EAM {
	m := trace.NewEAM(layers, experts)
	for l, x := range route {
		_ = m.Add(l, x, 1)
	}
	return m
}

// twoRequestPlanner plans from two one-token requests over 4 layers × 4
// experts that route in opposite orders, matching one EAM.
func twoRequestPlanner(t *testing.T) *Planner {
	t.Helper()
	coll, err := trace.NewCollection(4, 4, 10)
	require.NoError(t, err)
	require.NoError(t, coll.Add(eam(4, 4, 0, 1, 2, 3)))
	require.NoError(t, coll.Add(eam(4, 4, 3, 2, 1, 0)))
	p := NewPlanner(coll)
	p.Matches = 1
	p.MinEvidence = 0 // one-token EAMs
	return p
}

func TestPlannerPredictsLaterLayersFromSimilarRequests(t *testing.T) {
	p := twoRequestPlanner(t)

	plan := p.Plan(eam(4, 4, 0), 0)
	require.NotEmpty(t, plan)
	// Layer 1 is nearest, so it outranks layers 2 and 3 (proximity weight).
	assert.Equal(t, k(1, 1), plan[0].Key)
	assert.Equal(t, k(2, 2), plan[1].Key)
	assert.Equal(t, k(3, 3), plan[2].Key)
	assert.InDelta(t, 1-1.0/4, plan[0].Score, 1e-6)
	for _, c := range plan {
		assert.Greater(t, c.Key.Layer, int32(0), "nothing planned for layers already run")
	}

	p.Horizon = 1
	plan = p.Plan(eam(4, 4, 0), 0)
	require.Len(t, plan, 1)
	assert.Equal(t, k(1, 1), plan[0].Key)

	p.Horizon = 0
	p.MaxCandidates = 2
	assert.Len(t, p.Plan(eam(4, 4, 0), 0), 2)

	p.MinScore = 0.9
	assert.Empty(t, p.Plan(eam(4, 4, 0), 0))
}

func TestPlannerWithNothingToMatch(t *testing.T) {
	coll, err := trace.NewCollection(2, 2, 4)
	require.NoError(t, err)
	p := NewPlanner(coll)
	p.MinEvidence = 0
	assert.Nil(t, p.Plan(eam(2, 2, 0), 0), "empty collection")
	var nilPlanner *Planner
	assert.Nil(t, nilPlanner.Plan(eam(2, 2, 0), 0))
	assert.Nil(t, p.Plan(nil, 0))
	p.Matches = 0
	require.NoError(t, coll.Add(eam(2, 2, 1, 1)))
	assert.Nil(t, p.Plan(eam(2, 2, 0), 0), "no positive similarity")
	assert.NotEmpty(t, p.Plan(eam(2, 2, 1), 0))
}

func TestQueueIdleTracksPoppedWork(t *testing.T) {
	q := NewQueue()
	assert.True(t, q.Idle())
	q.Update(1, []Candidate{{k(1, 1), 1}})
	assert.False(t, q.Idle())
	_, ok := q.TryPop()
	require.True(t, ok)
	assert.False(t, q.Idle(), "popped but not done")
	q.Done()
	assert.True(t, q.Idle())
	q.Done() // extra Done is harmless
	assert.True(t, q.Idle())
}

func TestPlannerIssuesNothingForUniformPredictions(t *testing.T) {
	const L, E = 3, 8
	coll, err := trace.NewCollection(L, E, 8)
	require.NoError(t, err)
	flat := trace.NewEAM(L, E)
	for l := 0; l < L; l++ {
		for e := 0; e < E; e++ {
			require.NoError(t, flat.Add(l, e, 10))
		}
	}
	require.NoError(t, coll.Add(flat))
	p := NewPlanner(coll)
	assert.Empty(t, p.Plan(flat.Clone(), 0), "a uniform prediction is no better than a guess")
	p.Confidence = 0
	assert.Len(t, p.Plan(flat.Clone(), 0), (L-1)*E, "without the filter every expert is a candidate")
}

func TestPlannerNeedsEvidence(t *testing.T) {
	coll, err := trace.NewCollection(2, 4, 4)
	require.NoError(t, err)
	require.NoError(t, coll.Add(eam(4, 2, 1, 1)))
	p := NewPlanner(coll)
	assert.Empty(t, p.Plan(eam(4, 2, 1), 0), "one routed token is not evidence")
	p.MinEvidence = 1
	assert.NotEmpty(t, p.Plan(eam(4, 2, 1), 0))
}

func TestPlanNextPredictsEveryLayerOfTheNextPass(t *testing.T) {
	p := twoRequestPlanner(t)
	// A complete pass like the second EAM: match on all of it.
	plan := p.PlanNext(eam(4, 4, 3, 2, 1, 0))
	require.Len(t, plan, 4)
	assert.Equal(t, k(0, 3), plan[0].Key, "the first layer of the next pass is nearest")
	assert.InDelta(t, 1.0, plan[0].Score, 1e-6)
	assert.Equal(t, k(3, 0), plan[3].Key)
	var nilPlanner *Planner
	assert.Nil(t, nilPlanner.PlanNext(eam(4, 4, 0)))
	assert.Nil(t, p.PlanNext(nil))
}

func TestMinTokenShareNeedsTopKAndDropsExpertsFewTokensUse(t *testing.T) {
	// 16 experts, top-2, 10 tokens: layer 1 of the stored request routes
	// all 10 tokens to expert 3, 2 to expert 5 and the other 8 routings one
	// each to experts 6-13 (20 routings).
	const L, E = 2, 16
	stored := trace.NewEAM(L, E)
	stored.Counts[0*E+0] = 20
	row := stored.Counts[1*E : 2*E]
	row[3], row[5] = 10, 2
	for x := 6; x < 14; x++ {
		row[x] = 1
	}
	coll, err := trace.NewCollection(L, E, 4)
	require.NoError(t, err)
	require.NoError(t, coll.Add(stored))
	p := NewPlanner(coll)
	p.MinEvidence = 0
	partial := trace.NewEAM(L, E)
	partial.Counts[0] = 1
	keys := func() []cache.Key {
		var out []cache.Key
		for _, c := range p.Plan(partial, 0) {
			out = append(out, c.Key)
		}
		return out
	}
	// Without k the filter is off: confidence alone (2/16 of the routing)
	// keeps expert 3 (10/20) but not 5 (2/20 < 2/16).
	assert.Equal(t, []cache.Key{k(1, 3)}, keys())
	p.Confidence = 0
	assert.Len(t, keys(), 10, "no filter: every routed expert")
	p.SetTopK(2) // expert 3 serves 10 of 10 tokens, expert 5 serves 2 of 10
	assert.Equal(t, []cache.Key{k(1, 3)}, keys())
	p.MinTokenShare = 0.15 // expert 5: 2 of 10 tokens; experts 6-13: 1 of 10
	assert.ElementsMatch(t, []cache.Key{k(1, 3), k(1, 5)}, keys())
	p.Tune(0, 0, -1)
	assert.Zero(t, p.MinTokenShare, "negative turns the filter off")
	p.Tune(3, 0, 0.7)
	assert.Equal(t, 3.0, p.Confidence)
	assert.Equal(t, 0.7, p.MinTokenShare)
}

// TestPlanRequest_EqualsPlan checks that planning from a tracked request
// (incremental matching) gives the plans Plan and PlanNext give for a copy
// of its partial EAM, layer by layer, and reports unknown requests.
func TestPlanRequest_EqualsPlan(t *testing.T) {
	p := twoRequestPlanner(t)
	tr := trace.NewTracker(p.coll)
	id := tr.Begin()
	routes := []int{3, 2, 0, 1}
	for l, x := range routes {
		row := make([]float32, 4)
		row[x] = 1
		require.NoError(t, tr.Observe(id, l, row))
		partial, ok := tr.Partial(id)
		require.True(t, ok)
		got, ok := p.PlanRequest(tr, id, l)
		require.True(t, ok)
		assert.Equal(t, p.Plan(partial, l), got, "layer %d", l)
		next, ok := p.PlanNextRequest(tr, id)
		require.True(t, ok)
		assert.Equal(t, p.PlanNext(partial), next, "next pass after layer %d", l)
	}
	assert.NotEmpty(t, p.PlanNext(func() *trace.EAM { m, _ := tr.Partial(id); return m }()), "the comparison is not vacuous")

	require.NoError(t, tr.End(id))
	_, ok := p.PlanRequest(tr, id, 0)
	assert.False(t, ok, "ended request")
	_, ok = p.PlanNextRequest(tr, id)
	assert.False(t, ok, "ended request")

	other, err := trace.NewCollection(4, 4, 10)
	require.NoError(t, err)
	otr := trace.NewTracker(other)
	plan, ok := p.PlanRequest(otr, otr.Begin(), 0)
	assert.True(t, ok)
	assert.Nil(t, plan, "a tracker of another collection gives no plan")
}
