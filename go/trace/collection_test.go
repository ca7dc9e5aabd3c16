package trace

import (
	"math"
	"math/rand/v2"
	"runtime"
	"slices"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// collOf builds a collection of the given capacity holding ms in order.
func collOf(t testing.TB, capacity int, ms ...*EAM) *Collection {
	t.Helper()
	c, err := NewCollection(ms[0].Layers, ms[0].Experts, capacity)
	require.NoError(t, err)
	for _, m := range ms {
		require.NoError(t, c.Add(m))
	}
	return c
}

func TestNewCollection_ValidatesDimensions(t *testing.T) {
	tests := []struct {
		name                      string
		layers, experts, capacity int
		wantErr                   string
	}{
		{"valid", 4, 8, 10, ""},
		{"at float limit", 1 << 14, 1 << 14, 1, ""},
		{"zero layers", 0, 8, 10, "must be >= 1"},
		{"zero experts", 4, 0, 10, "must be >= 1"},
		{"zero capacity", 4, 8, 0, "must be >= 1"},
		{"negative capacity", 4, 8, -1, "must be >= 1"},
		{"too many floats", 1 << 14, 1 << 14, 2, "exceeds"},
		{"product overflows int", math.MaxInt / 2, 4, 1, "exceeds"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c, err := NewCollection(tc.layers, tc.experts, tc.capacity)
			if tc.wantErr != "" {
				require.ErrorContains(t, err, tc.wantErr)
				assert.Nil(t, c)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.layers, c.Layers())
			assert.Equal(t, tc.experts, c.Experts())
			assert.Equal(t, tc.capacity, c.Capacity())
			assert.Zero(t, c.Len())
		})
	}
}

func TestCollectionCheckShape_NamesBothShapes(t *testing.T) {
	c, err := NewCollection(32, 8, 4)
	require.NoError(t, err)
	require.NoError(t, c.CheckShape(32, 8))
	err = c.CheckShape(48, 128)
	require.ErrorIs(t, err, ErrShapeMismatch)
	assert.ErrorContains(t, err, "48 layers x 128 experts")
	assert.ErrorContains(t, err, "32 layers x 8 experts")
}

func TestCollectionAdd_RejectsInvalidEAMs(t *testing.T) {
	tests := []struct {
		name    string
		m       *EAM
		wantErr error
		wantMsg string
	}{
		{"nil", nil, nil, "nil EAM"},
		{"wrong layers", NewEAM(3, 2), ErrShapeMismatch, "got 3 layers x 2 experts, want 2 layers x 2 experts"},
		{"wrong experts", NewEAM(2, 3), ErrShapeMismatch, "want 2 layers x 2 experts"},
		{"short counts", &EAM{Layers: 2, Experts: 2, Counts: []float32{1}}, ErrShapeMismatch, "1 counts"},
		{"NaN", eamOf([]float32{1, float32(math.NaN())}, []float32{0, 0}), ErrInvalidCount, "layer 0, expert 1"},
		{"Inf", eamOf([]float32{1, 0}, []float32{float32(math.Inf(1)), 0}), ErrInvalidCount, "layer 1, expert 0"},
		{"negative", eamOf([]float32{1, 0}, []float32{0, -2}), ErrInvalidCount, "layer 1, expert 1"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c, err := NewCollection(2, 2, 3)
			require.NoError(t, err)
			err = c.Add(tc.m)
			require.Error(t, err)
			if tc.wantErr != nil {
				require.ErrorIs(t, err, tc.wantErr)
			}
			assert.ErrorContains(t, err, tc.wantMsg)
			assert.Zero(t, c.Len())
		})
	}
}

func TestCollectionAdd_IgnoresAllZeroAndStoresCopies(t *testing.T) {
	c, err := NewCollection(1, 2, 3)
	require.NoError(t, err)
	require.NoError(t, c.Add(NewEAM(1, 2)))
	assert.Zero(t, c.Len(), "all-zero EAM must be ignored")

	m := eamOf([]float32{1, 2})
	require.NoError(t, c.Add(m))
	m.Counts[0] = 50
	snap := c.Snapshot()
	require.Len(t, snap, 1)
	assert.Equal(t, []float32{1, 2}, snap[0].Counts, "Add must store a copy")
	snap[0].Counts[1] = 70
	assert.Equal(t, []float32{1, 2}, c.Snapshot()[0].Counts, "Snapshot must return copies")
}

func TestCollectionAdd_ReplacesMostSimilarWhenFull(t *testing.T) {
	a := []float32{1, 0, 0}
	b := []float32{0, 1, 0}
	d := []float32{0, 0, 1}
	tests := []struct {
		name   string
		stored [][]float32
		add    []float32
		want   [][]float32
	}{
		{"closest to second", [][]float32{a, b, d}, []float32{0.1, 1, 0}, [][]float32{a, {0.1, 1, 0}, d}},
		{"closest to first", [][]float32{a, b, d}, []float32{1, 0.1, 0.2}, [][]float32{{1, 0.1, 0.2}, b, d}},
		{"closest to last", [][]float32{a, b, d}, []float32{0, 0.3, 5}, [][]float32{a, b, {0, 0.3, 5}}},
		{"duplicate of stored", [][]float32{a, b, d}, []float32{0, 7, 0}, [][]float32{a, {0, 7, 0}, d}},
		{"tie picks lowest index", [][]float32{a, b, d}, []float32{0, 1, 1}, [][]float32{a, {0, 1, 1}, d}},
		{"three-way tie picks first", [][]float32{a, b, d}, []float32{1, 1, 1}, [][]float32{{1, 1, 1}, b, d}},
		{"orthogonal to all picks first", [][]float32{a, b}, []float32{0, 0, 4}, [][]float32{{0, 0, 4}, b}},
		{"capacity one always replaces", [][]float32{a}, b, [][]float32{b}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ms := make([]*EAM, len(tc.stored))
			for i, r := range tc.stored {
				ms[i] = eamOf(r)
			}
			c := collOf(t, len(ms), ms...)
			require.NoError(t, c.Add(eamOf(tc.add)))
			require.Equal(t, len(tc.want), c.Len())
			for i, m := range c.Snapshot() {
				assert.Equal(t, tc.want[i], m.Counts, "entry %d", i)
			}
		})
	}
}

func TestCollectionAdd_ReplacementUsesAllLayers(t *testing.T) {
	// Both stored EAMs agree with the new one on layer 0; only layer 1
	// decides, and it points at the second one.
	s0 := eamOf([]float32{1, 0}, []float32{1, 0})
	s1 := eamOf([]float32{1, 0}, []float32{0, 1})
	c := collOf(t, 2, s0, s1)
	n := eamOf([]float32{1, 0}, []float32{0, 2})
	require.NoError(t, c.Add(n))
	snap := c.Snapshot()
	assert.Equal(t, s0.Counts, snap[0].Counts)
	assert.Equal(t, n.Counts, snap[1].Counts)
}

func TestCollectionMatch_OrdersBestFirstWithIndexTieBreak(t *testing.T) {
	// Entries 3 and 4 are power-of-two multiples of simple vectors so that
	// the tied similarities below are bit-identical in floating point.
	c := collOf(t, 10,
		eamOf([]float32{1, 0}, []float32{0, 1}), // 0: A
		eamOf([]float32{0, 1}, []float32{0, 1}), // 1
		eamOf([]float32{1, 1}, []float32{1, 0}), // 2
		eamOf([]float32{2, 0}, []float32{2, 0}), // 3
		eamOf([]float32{4, 0}, []float32{0, 4}), // 4: 4A
	)
	q := eamOf([]float32{1, 0}, []float32{0, 0})
	inv2 := 1 / math.Sqrt2
	tests := []struct {
		name    string
		partial *EAM
		upto, k int
		want    []Match
	}{
		{"layer 0 all", q, 0, 10, []Match{{0, 1}, {3, 1}, {4, 1}, {2, inv2}, {1, 0}}},
		{"layer 0 top 2", q, 0, 2, []Match{{0, 1}, {3, 1}}},
		{"layer 0 top 4", q, 0, 4, []Match{{0, 1}, {3, 1}, {4, 1}, {2, inv2}}},
		// Over both layers q = [1,0 | 0,0]: 0, 3 and 4 tie at 1/sqrt2, 2 has
		// 1/sqrt3, 1 has 0.
		{"upto clamped to last layer", q, 5, 3, []Match{{0, inv2}, {3, inv2}, {4, inv2}}},
		// q = A: 0 and 4 tie at 1; 1 and 3 tie at 1/2; 2 has 1/sqrt6.
		{"both layers", eamOf([]float32{1, 0}, []float32{0, 1}), 1, 4,
			[]Match{{0, 1}, {4, 1}, {1, 0.5}, {3, 0.5}}},
		{"k <= 0", q, 0, 0, nil},
		{"negative upto", q, -1, 3, nil},
		{"shape mismatch", NewEAM(3, 2), 0, 3, nil},
		{"nil partial", nil, 0, 3, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := c.Match(tc.partial, tc.upto, tc.k)
			if tc.want == nil {
				assert.Nil(t, got)
				return
			}
			require.Len(t, got, len(tc.want))
			for i := range tc.want {
				assert.Equal(t, tc.want[i].Index, got[i].Index, "rank %d", i)
				assert.InDelta(t, tc.want[i].Similarity, got[i].Similarity, 1e-12, "rank %d", i)
			}
		})
	}
}

func TestCollectionMatch_EmptyCollectionReturnsNil(t *testing.T) {
	c, err := NewCollection(2, 2, 4)
	require.NoError(t, err)
	assert.Nil(t, c.Match(eamOf([]float32{1, 0}, []float32{0, 1}), 1, 3))
}

func TestCollectionMatch_AgreesWithBruteForceCosine(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	const layers, experts, n = 6, 5, 200
	c, err := NewCollection(layers, experts, n)
	require.NoError(t, err)
	for range n {
		m := NewEAM(layers, experts)
		for i := range m.Counts {
			m.Counts[i] = float32(rng.IntN(3)) // small ints: many exact ties
		}
		m.Counts[0] += 1 // never all-zero
		require.NoError(t, c.Add(m))
	}
	snap := c.Snapshot()
	for trial := range 20 {
		q := NewEAM(layers, experts)
		for i := range q.Counts {
			q.Counts[i] = float32(rng.IntN(3))
		}
		upto := trial % layers
		all := make([]Match, len(snap))
		for i, m := range snap {
			all[i] = Match{i, Cosine(q, m, upto)}
		}
		slices.SortStableFunc(all, func(a, b Match) int {
			switch {
			case a.Similarity > b.Similarity:
				return -1
			case a.Similarity < b.Similarity:
				return 1
			}
			return 0
		})
		for _, k := range []int{1, 7, 50, n, n + 5} {
			got := c.Match(q, upto, k)
			assert.Equal(t, all[:min(k, n)], got, "trial %d k %d", trial, k)
		}
	}
}

// predictColl is the fixture of the Predict tests: 4 layers x 2 experts.
func predictColl(t *testing.T) *Collection {
	return collOf(t, 3,
		eamOf([]float32{1, 0}, []float32{3, 1}, []float32{0, 0}, []float32{2, 2}),       // E0
		eamOf([]float32{1, 1}, []float32{1, 1}, []float32{4, 0}, []float32{0, 0}),       // E1
		eamOf([]float32{0, 1}, []float32{0, 100}, []float32{0, 100}, []float32{0, 100}), // E2
	)
}

func TestCollectionPredict_NormalisesRowsAndWeighsByProximity(t *testing.T) {
	p0 := eamOf([]float32{1, 0}, []float32{0, 0}, []float32{0, 0}, []float32{0, 0})
	p1 := eamOf([]float32{1, 0}, []float32{3, 1}, []float32{0, 0}, []float32{0, 0})
	tests := []struct {
		name     string
		partial  *EAM
		layer, k int
		want     [][]float32
	}{
		// k=2 picks E0 (sim 1) and E1 (sim 1/sqrt2). Row 1: [4,2] -> [2/3,1/3]
		// x (1-1/4); row 2: [4,0] -> [1,0] x (1-2/4); row 3: [2,2] -> [.5,.5]
		// x (1-3/4).
		{"two matches", p0, 0, 2, [][]float32{{0, 0}, {0.5, 0.25}, {0.5, 0}, {0.125, 0.125}}},
		// E2 has similarity 0 and must contribute nothing.
		{"zero similarity ignored", p0, 0, 3, [][]float32{{0, 0}, {0.5, 0.25}, {0.5, 0}, {0.125, 0.125}}},
		{"k clamped to len", p0, 0, 99, [][]float32{{0, 0}, {0.5, 0.25}, {0.5, 0}, {0.125, 0.125}}},
		// k=1 picks E0 only; its row 2 is all-zero and stays zero.
		{"single match keeps zero row", p0, 0, 1, [][]float32{{0, 0}, {0.5625, 0.1875}, {0, 0}, {0.125, 0.125}}},
		// At layer 1 only rows 2 and 3 are predicted; row 3 weight 1-2/4.
		{"later layer", p1, 1, 1, [][]float32{{0, 0}, {0, 0}, {0, 0}, {0.25, 0.25}}},
		{"last layer predicts nothing", p1, 3, 1, [][]float32{{0, 0}, {0, 0}, {0, 0}, {0, 0}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := predictColl(t).Predict(tc.partial, tc.layer, tc.k)
			require.NotNil(t, got)
			require.Equal(t, 4, got.Layers)
			require.Equal(t, 2, got.Experts)
			for l, row := range tc.want {
				assert.InDeltaSlice(t, row, got.Row(l), 1e-7, "row %d", l)
			}
		})
	}
}

func TestCollectionPredict_ReturnsNilWhenNothingToPredictFrom(t *testing.T) {
	p0 := eamOf([]float32{1, 0}, []float32{0, 0}, []float32{0, 0}, []float32{0, 0})
	empty, err := NewCollection(4, 2, 3)
	require.NoError(t, err)
	onlyE0 := collOf(t, 2, eamOf([]float32{1, 0}, []float32{3, 1}, []float32{0, 0}, []float32{2, 2}))
	tests := []struct {
		name     string
		c        *Collection
		partial  *EAM
		layer, k int
	}{
		{"empty collection", empty, p0, 0, 2},
		{"no positive similarity", onlyE0, eamOf([]float32{0, 1}, []float32{0, 0}, []float32{0, 0}, []float32{0, 0}), 0, 2},
		{"all-zero partial", predictColl(t), NewEAM(4, 2), 0, 2},
		{"negative layer", predictColl(t), p0, -1, 2},
		{"layer past end", predictColl(t), p0, 4, 2},
		{"k zero", predictColl(t), p0, 0, 0},
		{"shape mismatch", predictColl(t), NewEAM(4, 3), 0, 2},
		{"nil partial", predictColl(t), nil, 0, 2},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			assert.Nil(t, tc.c.Predict(tc.partial, tc.layer, tc.k))
		})
	}
}

func TestCollectionMatch_ParallelScanEqualsSerial(t *testing.T) {
	c := randomColl(t, 51, 6, 16, 300, 300)
	q := randomColl(t, 52, 6, 16, 1, 1).Snapshot()[0]
	for i := range q.Counts {
		q.Counts[i]++ // dense query
	}
	serial := c.Match(q, 4, 300)
	serialPred := c.Predict(q, 2, 5)

	old, oldProcs := parallelWork, runtime.GOMAXPROCS(4)
	parallelWork = 1
	t.Cleanup(func() { parallelWork = old; runtime.GOMAXPROCS(oldProcs) })
	assert.Equal(t, serial, c.Match(q, 4, 300))
	assert.Equal(t, serialPred, c.Predict(q, 2, 5))

	// Replacement in a full collection uses the same scan.
	require.NoError(t, c.Add(q))
	found := false
	for _, m := range c.Snapshot() {
		found = found || slices.Equal(m.Counts, q.Counts)
	}
	assert.True(t, found)
}
