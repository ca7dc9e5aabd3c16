// Package trace implements request-level expert-activation tracing for the
// MoE-Infinity offloading engine.
//
// Every request (one sequence being generated) accumulates an Expert
// Activation Matrix (EAM): EAM[layer][expert] is the number of tokens that the
// router sent to that expert in that MoE layer, counting prefill and decode
// tokens alike. Finished requests retire their EAM into an EAM Collection
// (EAMC, type Collection) of bounded capacity. While a request is still
// running, its partial EAM (layers 0..l filled so far) is matched against the
// collection to predict which experts later layers will need (Predict). The
// collection persists to a versioned, checksummed binary trace file
// (Save/Load, SaveFile/LoadFile).
//
// Tracker ties the pieces together for the engine: it holds the live EAMs of
// in-flight requests and retires them into a Collection when they end.
package trace

import (
	"errors"
	"fmt"
	"math"
)

// ErrOutOfRange is returned (wrapped) when a layer or expert index lies
// outside an EAM's shape.
var ErrOutOfRange = errors.New("trace: index out of range")

// ErrInvalidCount is returned (wrapped) when a token count is NaN, infinite
// or negative. EAM entries are token counts and must be finite and >= 0.
var ErrInvalidCount = errors.New("trace: invalid token count")

// EAM is an expert activation matrix: Layers x Experts token counts stored
// row-major in Counts (Counts[layer*Experts+expert]). Each entry is the number
// of tokens (dimensionless count, stored as float32 so that fractional or
// scaled counts are representable) routed to expert in layer.
//
// An EAM is not safe for concurrent mutation; Tracker and Collection take
// care of synchronisation for the EAMs they own.
type EAM struct {
	// Layers is the number of MoE layers (rows).
	Layers int
	// Experts is the number of experts per MoE layer (columns).
	Experts int
	// Counts holds Layers*Experts token counts, row-major.
	Counts []float32
}

// NewEAM returns an all-zero EAM of layers x experts. It panics if either
// dimension is negative or their product overflows int; zero dimensions give
// an empty matrix.
func NewEAM(layers, experts int) *EAM {
	if layers < 0 || experts < 0 {
		panic(fmt.Sprintf("trace: NewEAM(%d, %d): negative dimension", layers, experts))
	}
	if experts != 0 && layers > math.MaxInt/experts {
		panic(fmt.Sprintf("trace: NewEAM(%d, %d): size overflows int", layers, experts))
	}
	return &EAM{Layers: layers, Experts: experts, Counts: make([]float32, layers*experts)}
}

// Add adds tokens (a token count, >= 0 and finite) to the entry of (layer,
// expert). It returns an error wrapping ErrOutOfRange if the indices lie
// outside the matrix and ErrInvalidCount if tokens is NaN, infinite or
// negative; the matrix is unchanged on error.
func (m *EAM) Add(layer, expert int, tokens float32) error {
	if layer < 0 || layer >= m.Layers || expert < 0 || expert >= m.Experts {
		return fmt.Errorf("%w: (layer %d, expert %d) outside %dx%d EAM",
			ErrOutOfRange, layer, expert, m.Layers, m.Experts)
	}
	if !validCount(tokens) {
		return fmt.Errorf("%w: %v tokens at (layer %d, expert %d)", ErrInvalidCount, tokens, layer, expert)
	}
	m.Counts[layer*m.Experts+expert] += tokens
	return nil
}

// Row returns a view (not a copy) of the Experts token counts of layer;
// writes through the returned slice modify m. It returns nil if layer is out
// of range.
func (m *EAM) Row(layer int) []float32 {
	if layer < 0 || layer >= m.Layers || len(m.Counts) < m.Layers*m.Experts {
		return nil
	}
	lo := layer * m.Experts
	return m.Counts[lo : lo+m.Experts : lo+m.Experts]
}

// Clone returns a deep copy of m.
func (m *EAM) Clone() *EAM {
	c := &EAM{Layers: m.Layers, Experts: m.Experts, Counts: make([]float32, len(m.Counts))}
	copy(c.Counts, m.Counts)
	return c
}

// Reset sets every count of m to zero, keeping its shape.
func (m *EAM) Reset() {
	clear(m.Counts)
}

// Total returns the sum of all counts of m (tokens), accumulated in float64.
func (m *EAM) Total() float64 {
	var s float64
	for _, v := range m.Counts {
		s += float64(v)
	}
	return s
}

// wellFormed reports whether m has non-negative dimensions and exactly
// Layers*Experts counts.
func (m *EAM) wellFormed() bool {
	return m != nil && m.Layers >= 0 && m.Experts >= 0 && len(m.Counts) == m.Layers*m.Experts
}

// validate checks that m is well formed with shape layers x experts and that
// every count is finite and non-negative.
func (m *EAM) validate(layers, experts int) error {
	if m == nil {
		return errors.New("trace: nil EAM")
	}
	if m.Layers != layers || m.Experts != experts {
		return shapeError(layers, experts, m.Layers, m.Experts)
	}
	if len(m.Counts) != layers*experts {
		return fmt.Errorf("%w: EAM has %d counts, want %d (%dx%d)",
			ErrShapeMismatch, len(m.Counts), layers*experts, layers, experts)
	}
	for i, v := range m.Counts {
		if !validCount(v) {
			return fmt.Errorf("%w: %v tokens at (layer %d, expert %d)",
				ErrInvalidCount, v, i/experts, i%experts)
		}
	}
	return nil
}

// isZero reports whether every count of m is zero.
func (m *EAM) isZero() bool {
	for _, v := range m.Counts {
		if v != 0 {
			return false
		}
	}
	return true
}

// validCount reports whether v is a finite, non-negative token count.
func validCount(v float32) bool {
	f := float64(v)
	return f >= 0 && !math.IsInf(f, 1)
}

// Cosine returns the cosine similarity of a and b restricted to layers
// [0, upto] inclusive (pass upto = Layers-1, or anything larger, for the whole
// matrix), computed in float64. The result lies in [0, 1] for valid
// (non-negative) EAMs. It returns 0 if either matrix is all-zero over those
// layers, if upto < 0, if a and b differ in shape, if either is nil or
// malformed (len(Counts) != Layers*Experts), or if the result is not finite.
//
// a plays the role of the query (the same arithmetic as Collection.Match
// with partial = a), so Cosine(a, b) and Cosine(b, a) may differ in the last
// bits of rounding.
func Cosine(a, b *EAM, upto int) float64 {
	if !a.wellFormed() || !b.wellFormed() || a.Layers != b.Layers || a.Experts != b.Experts {
		return 0
	}
	if upto >= a.Layers {
		upto = a.Layers - 1
	}
	if upto < 0 {
		return 0
	}
	q := newQuery(a, upto)
	return cosineFrom(q.dot(b.Counts), q.sqNorm, sqNormUpto(b.Counts, b.Experts, upto))
}

// query is the sparse form of a query EAM restricted to layers [0, upto]:
// the positions (into Counts) and float64 values of its non-zero counts, in
// index order, with its squared norm over those layers.
type query struct {
	idx    []int
	val    []float64
	sqNorm float64
}

// newQuery builds the sparse query of m over layers [0, upto]; m must be
// well formed and 0 <= upto < m.Layers.
func newQuery(m *EAM, upto int) *query {
	n := (upto + 1) * m.Experts
	nz := 0
	for _, v := range m.Counts[:n] {
		if v != 0 {
			nz++
		}
	}
	q := &query{
		idx:    make([]int, 0, nz),
		val:    make([]float64, 0, nz),
		sqNorm: sqNormUpto(m.Counts, m.Experts, upto),
	}
	for i, v := range m.Counts[:n] {
		if v != 0 {
			q.idx = append(q.idx, i)
			q.val = append(q.val, float64(v))
		}
	}
	return q
}

// dot returns the float64 dot product of the query with counts (a full
// row-major matrix of the query's shape). Entries where the query is zero
// contribute exactly +0 for finite counts and are skipped; the remaining
// terms are accumulated round-robin in four partial sums for
// instruction-level parallelism and combined as (s0+s1)+(s2+s3).
func (q *query) dot(counts []float32) float64 {
	var s0, s1, s2, s3 float64
	idx, val := q.idx, q.val
	val = val[:len(idx)]
	i := 0
	for ; i+4 <= len(idx); i += 4 {
		s0 += val[i] * float64(counts[idx[i]])
		s1 += val[i+1] * float64(counts[idx[i+1]])
		s2 += val[i+2] * float64(counts[idx[i+2]])
		s3 += val[i+3] * float64(counts[idx[i+3]])
	}
	switch len(idx) - i {
	case 3:
		s2 += val[i+2] * float64(counts[idx[i+2]])
		fallthrough
	case 2:
		s1 += val[i+1] * float64(counts[idx[i+1]])
		fallthrough
	case 1:
		s0 += val[i] * float64(counts[idx[i]])
	}
	return (s0 + s1) + (s2 + s3)
}

// cosineFrom combines a dot product and two squared norms into a cosine
// similarity, mapping degenerate or non-finite results to 0.
func cosineFrom(d, na, nb float64) float64 {
	if na == 0 || nb == 0 {
		return 0
	}
	s := d / (math.Sqrt(na) * math.Sqrt(nb))
	if math.IsNaN(s) || math.IsInf(s, 0) {
		return 0
	}
	return s
}

// rowSqNorm returns the float64 squared Euclidean norm of row.
func rowSqNorm(row []float32) float64 {
	var s float64
	for _, v := range row {
		s += float64(v) * float64(v)
	}
	return s
}

// sqNormUpto returns the squared norm of rows [0, upto] of a row-major
// matrix with the given row width, summed row by row (the same order that
// prefixSqNorms uses, so both give bit-identical results).
func sqNormUpto(counts []float32, width, upto int) float64 {
	var s float64
	for l := 0; l <= upto; l++ {
		s += rowSqNorm(counts[l*width : (l+1)*width])
	}
	return s
}

// prefixSqNorms returns p with p[l] = squared norm of rows [0, l].
func prefixSqNorms(m *EAM) []float64 {
	p := make([]float64, m.Layers)
	var s float64
	for l := range m.Layers {
		s += rowSqNorm(m.Counts[l*m.Experts : (l+1)*m.Experts])
		p[l] = s
	}
	return p
}
