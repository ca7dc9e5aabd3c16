package trace

import (
	"math"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// eamOf builds an EAM from rows (all rows must have the same length).
func eamOf(rows ...[]float32) *EAM {
	m := NewEAM(len(rows), len(rows[0]))
	for l, r := range rows {
		copy(m.Row(l), r)
	}
	return m
}

func TestNewEAM_ReturnsZeroMatrixOfShape(t *testing.T) {
	tests := []struct {
		name            string
		layers, experts int
	}{
		{"regular", 3, 4},
		{"single cell", 1, 1},
		{"empty", 0, 5},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m := NewEAM(tc.layers, tc.experts)
			assert.Equal(t, tc.layers, m.Layers)
			assert.Equal(t, tc.experts, m.Experts)
			assert.Len(t, m.Counts, tc.layers*tc.experts)
			assert.Zero(t, m.Total())
		})
	}
}

func TestNewEAM_PanicsOnInvalidDimensions(t *testing.T) {
	tests := []struct {
		name            string
		layers, experts int
	}{
		{"negative layers", -1, 2},
		{"negative experts", 2, -1},
		{"overflow", math.MaxInt / 2, 3},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			assert.Panics(t, func() { NewEAM(tc.layers, tc.experts) })
		})
	}
}

func TestEAMAdd_AccumulatesOrRejects(t *testing.T) {
	tests := []struct {
		name          string
		layer, expert int
		tokens        float32
		wantErr       error
	}{
		{"valid", 1, 2, 3, nil},
		{"zero tokens", 0, 0, 0, nil},
		{"negative layer", -1, 0, 1, ErrOutOfRange},
		{"layer too large", 2, 0, 1, ErrOutOfRange},
		{"negative expert", 0, -1, 1, ErrOutOfRange},
		{"expert too large", 0, 3, 1, ErrOutOfRange},
		{"NaN tokens", 0, 0, float32(math.NaN()), ErrInvalidCount},
		{"+Inf tokens", 0, 0, float32(math.Inf(1)), ErrInvalidCount},
		{"-Inf tokens", 0, 0, float32(math.Inf(-1)), ErrInvalidCount},
		{"negative tokens", 0, 0, -1, ErrInvalidCount},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m := NewEAM(2, 3)
			err := m.Add(tc.layer, tc.expert, tc.tokens)
			if tc.wantErr != nil {
				require.ErrorIs(t, err, tc.wantErr)
				assert.Zero(t, m.Total(), "matrix must be unchanged on error")
				return
			}
			require.NoError(t, err)
			require.NoError(t, m.Add(tc.layer, tc.expert, tc.tokens))
			assert.Equal(t, 2*tc.tokens, m.Counts[tc.layer*3+tc.expert])
			assert.InDelta(t, float64(2*tc.tokens), m.Total(), 0)
		})
	}
}

func TestEAMRow_IsWritableViewOrNilOutOfRange(t *testing.T) {
	m := eamOf([]float32{1, 2}, []float32{3, 4})
	row := m.Row(1)
	assert.Equal(t, []float32{3, 4}, row)
	row[0] = 9
	assert.Equal(t, float32(9), m.Counts[2], "Row must be a view")
	assert.Len(t, m.Row(0)[:cap(m.Row(0))], 2, "view must not extend into the next row")

	for _, l := range []int{-1, 2} {
		assert.Nil(t, m.Row(l), "layer %d", l)
	}
	bad := &EAM{Layers: 2, Experts: 2, Counts: []float32{1}}
	assert.Nil(t, bad.Row(0), "malformed EAM")
}

func TestEAMClone_IsDeepAndResetZeroes(t *testing.T) {
	m := eamOf([]float32{1, 2}, []float32{3, 4})
	c := m.Clone()
	assert.Equal(t, m, c)
	c.Counts[0] = 100
	assert.Equal(t, float32(1), m.Counts[0], "clone must not share storage")
	assert.InDelta(t, 10.0, m.Total(), 0)

	m.Reset()
	assert.Zero(t, m.Total())
	assert.Equal(t, 2, m.Layers)
	assert.Equal(t, 2, m.Experts)
	assert.Len(t, m.Counts, 4)
}

func TestCosine_RestrictsToLayersUpTo(t *testing.T) {
	a := eamOf([]float32{1, 0}, []float32{0, 1})
	b := eamOf([]float32{1, 0}, []float32{1, 0})
	z := NewEAM(2, 2)
	inf := eamOf([]float32{float32(math.Inf(1)), 0}, []float32{0, 0})
	tests := []struct {
		name string
		a, b *EAM
		upto int
		want float64
	}{
		{"identical on layer 0", a, b, 0, 1},
		{"differ on layer 1", a, b, 1, 0.5},
		{"upto beyond last layer is clamped", a, b, 99, 0.5},
		{"self similarity", a, a, 1, 1},
		{"scale invariant", a, eamOf([]float32{5, 0}, []float32{0, 5}), 1, 1},
		{"orthogonal", eamOf([]float32{1, 0}), eamOf([]float32{0, 1}), 0, 0},
		{"negative upto", a, b, -1, 0},
		{"all-zero operand", a, z, 1, 0},
		{"zero over prefix only", eamOf([]float32{0, 0}, []float32{1, 0}), b, 0, 0},
		{"shape mismatch", a, eamOf([]float32{1, 0}), 0, 0},
		{"nil operand", a, nil, 0, 0},
		{"malformed operand", a, &EAM{Layers: 2, Experts: 2, Counts: []float32{1}}, 0, 0},
		{"non-finite result", inf, inf, 0, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			assert.InDelta(t, tc.want, Cosine(tc.a, tc.b, tc.upto), 1e-12)
			assert.InDelta(t, tc.want, Cosine(tc.b, tc.a, tc.upto), 1e-12, "symmetric")
		})
	}
}

func TestCosine_MatchesClosedFormOnThreeLayers(t *testing.T) {
	a := eamOf([]float32{1, 2}, []float32{3, 0}, []float32{0, 7})
	b := eamOf([]float32{2, 1}, []float32{1, 1}, []float32{5, 0})
	// upto 1: dot = 2+2+3+0 = 7; |a|^2 = 1+4+9 = 14; |b|^2 = 4+1+1+1 = 7.
	assert.InDelta(t, 7/math.Sqrt(14*7), Cosine(a, b, 1), 1e-15)
	// upto 2: dot = 7; |a|^2 = 63; |b|^2 = 32.
	assert.InDelta(t, 7/math.Sqrt(63*32), Cosine(a, b, 2), 1e-15)
}
