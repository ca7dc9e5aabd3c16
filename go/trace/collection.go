package trace

import (
	"errors"
	"fmt"
	"runtime"
	"slices"
	"sync"
)

// MaxFloats bounds the number of float32 counts a Collection may hold at
// full capacity (capacity*layers*experts): 1<<28 floats, i.e. 1 GiB of
// counts. NewCollection and Load both enforce it, so every collection that
// can be built can also be saved and reloaded.
const MaxFloats = 1 << 28

// ErrShapeMismatch is returned (wrapped) when an EAM or a trace file does not
// have the layers x experts shape that was expected.
var ErrShapeMismatch = errors.New("trace: EAM shape mismatch")

// shapeError reports a shape mismatch naming both shapes.
func shapeError(wantL, wantE, gotL, gotE int) error {
	return fmt.Errorf("%w: got %d layers x %d experts, want %d layers x %d experts",
		ErrShapeMismatch, gotL, gotE, wantL, wantE)
}

// Match is one result of Collection.Match: the index of a stored EAM (its
// position in Snapshot order) and its cosine similarity (in [0, 1]) to the
// query.
type Match struct {
	// Index is the position of the stored EAM in the collection.
	Index int
	// Similarity is the cosine similarity between the stored EAM and the
	// query over the matched layers.
	Similarity float64
}

// entry is one stored EAM together with its cached prefix squared norms.
type entry struct {
	m  *EAM
	pn []float64 // pn[l] = squared norm of rows [0, l]
}

// Collection is the EAM Collection (EAMC): a bounded set of EAMs of finished
// requests, all of shape Layers x Experts. When it is full, a new EAM
// replaces the stored EAM most similar to it, which keeps the collection
// diverse. Collection is safe for concurrent use.
type Collection struct {
	mu       sync.RWMutex
	layers   int
	experts  int
	capacity int
	entries  []entry
	// synced maps a trace file (absolute path) to the multiset of EAM ids
	// (eamID) this collection last loaded from or saved to it; SaveFile
	// uses it to tell this collection's new EAMs from the file's (see
	// merge.go). Stored EAMs are never mutated, only replaced, so
	// entries may be shared read-only with the collections SaveFile builds.
	synced map[string]map[uint64]int

	// version counts the changes of entries (appends and replacements);
	// changed[(v-1)%changeLogLen] is the index that change v stored, so a
	// Matcher can catch up on the last changeLogLen changes one entry at
	// a time (matcher.go).
	version uint64
	changed [changeLogLen]int
	// cols is the transpose of the stored counts, built on first use by a
	// Matcher: cols[(l*Experts+x)*capacity+i] = entries[i] count of
	// (layer l, expert x), so one query count meets every stored EAM in
	// one contiguous run. nil until then; never reset.
	cols []float32
}

// NewCollection returns an empty collection for EAMs of layers x experts
// holding at most capacity EAMs. All three must be >= 1 and
// capacity*layers*experts must not exceed MaxFloats.
func NewCollection(layers, experts, capacity int) (*Collection, error) {
	if err := checkDims(layers, experts, capacity); err != nil {
		return nil, err
	}
	return &Collection{layers: layers, experts: experts, capacity: capacity}, nil
}

// checkDims validates collection dimensions without overflowing.
func checkDims(layers, experts, capacity int) error {
	if layers < 1 || experts < 1 || capacity < 1 {
		return fmt.Errorf("trace: invalid collection dimensions %d layers x %d experts, capacity %d: all must be >= 1",
			layers, experts, capacity)
	}
	if layers > MaxFloats/experts || layers*experts > MaxFloats/capacity {
		return fmt.Errorf("trace: collection of %d layers x %d experts x capacity %d exceeds %d floats",
			layers, experts, capacity, MaxFloats)
	}
	return nil
}

// Layers returns the number of MoE layers of the stored EAMs.
func (c *Collection) Layers() int { return c.layers }

// Experts returns the number of experts per layer of the stored EAMs.
func (c *Collection) Experts() int { return c.experts }

// Capacity returns the maximum number of EAMs the collection holds.
func (c *Collection) Capacity() int { return c.capacity }

// Len returns the number of EAMs currently stored.
func (c *Collection) Len() int {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return len(c.entries)
}

// CheckShape returns nil if the collection stores EAMs of layers x experts,
// and otherwise an error wrapping ErrShapeMismatch that names both shapes
// (for instance when a trace file recorded for another model is loaded).
func (c *Collection) CheckShape(layers, experts int) error {
	if layers != c.layers || experts != c.experts {
		return shapeError(c.layers, c.experts, layers, experts)
	}
	return nil
}

// Add stores a copy of m. m must have the collection's shape (else an error
// wrapping ErrShapeMismatch) and only finite, non-negative counts (else
// ErrInvalidCount). An all-zero m carries no information and is ignored
// (Add returns nil). When the collection is full, the copy replaces the
// stored EAM with the highest cosine similarity to m over all layers (ties:
// lowest index).
func (c *Collection) Add(m *EAM) error {
	if err := m.validate(c.layers, c.experts); err != nil {
		return err
	}
	if m.isZero() {
		return nil
	}
	m = m.Clone()
	c.mu.Lock()
	defer c.mu.Unlock()
	c.insertLocked(entry{m: m, pn: prefixSqNorms(m)})
	return nil
}

// insertLocked stores e (a valid, non-zero EAM of the collection's shape,
// owned by the collection from now on) under Add's replacement rule. The
// caller holds c.mu for writing.
func (c *Collection) insertLocked(e entry) {
	at := len(c.entries)
	if at < c.capacity {
		c.entries = append(c.entries, e)
	} else {
		sims := c.similarities(newQuery(e.m, c.layers-1), c.layers-1)
		at = 0
		for i, s := range sims {
			if s > sims[at] {
				at = i
			}
		}
		c.entries[at] = e
	}
	c.version++
	c.changed[(c.version-1)%changeLogLen] = at
	if c.cols != nil {
		c.setColLocked(at)
	}
}

// Snapshot returns deep copies of the stored EAMs in index order.
func (c *Collection) Snapshot() []*EAM {
	c.mu.RLock()
	defer c.mu.RUnlock()
	out := make([]*EAM, len(c.entries))
	for i := range c.entries {
		out[i] = c.entries[i].m.Clone()
	}
	return out
}

// parallelWork is the number of multiply-adds (stored EAMs x non-zero
// query counts) per goroutine above which similarities are computed on
// several goroutines. A variable so tests can force the parallel path.
var parallelWork = 1 << 18

// similarities returns the cosine similarity of every stored EAM to q over
// layers [0, upto], indexed like c.entries. Large scans are split over up to
// GOMAXPROCS goroutines; each similarity is computed independently, so the
// result does not depend on the split. The caller holds c.mu.
func (c *Collection) similarities(q *query, upto int) []float64 {
	sims := make([]float64, len(c.entries))
	fill := func(lo, hi int) {
		for i := lo; i < hi; i++ {
			e := &c.entries[i]
			sims[i] = cosineFrom(q.dot(e.m.Counts), q.sqNorm, e.pn[upto])
		}
	}
	workers := min(runtime.GOMAXPROCS(0), len(sims)*(len(q.idx)+1)/parallelWork)
	if workers <= 1 {
		fill(0, len(sims))
		return sims
	}
	var wg sync.WaitGroup
	chunk := (len(sims) + workers - 1) / workers
	for lo := 0; lo < len(sims); lo += chunk {
		hi := min(lo+chunk, len(sims))
		wg.Go(func() { fill(lo, hi) })
	}
	wg.Wait()
	return sims
}

// Match returns the indices and cosine similarities of the k stored EAMs
// most similar to partial over layers [0, upto], best first (ties: lower
// index first). upto larger than Layers-1 is clamped to Layers-1. Fewer than
// k results are returned if the collection holds fewer EAMs. Match returns
// nil if k <= 0, upto < 0, the collection is empty, or partial is nil,
// malformed or of another shape. Stored EAMs with similarity 0 are included
// if they are among the k best.
func (c *Collection) Match(partial *EAM, upto int, k int) []Match {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.matchLocked(partial, upto, k)
}

// matchLocked implements Match; the caller holds c.mu (read or write).
func (c *Collection) matchLocked(partial *EAM, upto int, k int) []Match {
	if k <= 0 || len(c.entries) == 0 || !partial.wellFormed() ||
		partial.Layers != c.layers || partial.Experts != c.experts {
		return nil
	}
	if upto >= c.layers {
		upto = c.layers - 1
	}
	if upto < 0 {
		return nil
	}
	return topMatches(c.similarities(newQuery(partial, upto), upto), k)
}

// topMatches returns the min(k, len(sims)) best (index, similarity) pairs
// of sims, best first (ties: lower index first); k >= 1.
func topMatches(sims []float64, k int) []Match {
	k = min(k, len(sims))
	// Bounded heap of the k best so far; the root is the worst of them.
	h := make([]Match, 0, k)
	for i, s := range sims {
		m := Match{Index: i, Similarity: s}
		switch {
		case len(h) < k:
			h = append(h, m)
			heapUp(h, len(h)-1)
		case better(m, h[0]):
			h[0] = m
			heapDown(h, 0)
		}
	}
	slices.SortFunc(h, func(a, b Match) int {
		if better(a, b) {
			return -1
		}
		if better(b, a) {
			return 1
		}
		return 0
	})
	return h
}

// better reports whether a ranks before b: higher similarity, then lower
// index. Similarities are never NaN (cosineFrom maps them to 0).
func better(a, b Match) bool {
	if a.Similarity != b.Similarity {
		return a.Similarity > b.Similarity
	}
	return a.Index < b.Index
}

// heapUp restores the min-heap (worst at the root) after appending at i.
func heapUp(h []Match, i int) {
	for i > 0 {
		p := (i - 1) / 2
		if !better(h[p], h[i]) {
			return
		}
		h[p], h[i] = h[i], h[p]
		i = p
	}
}

// heapDown restores the min-heap (worst at the root) after replacing i.
func heapDown(h []Match, i int) {
	for {
		w := i
		l, r := 2*i+1, 2*i+2
		if l < len(h) && better(h[w], h[l]) {
			w = l
		}
		if r < len(h) && better(h[w], h[r]) {
			w = r
		}
		if w == i {
			return
		}
		h[w], h[i] = h[i], h[w]
		i = w
	}
}

// Predict predicts the expert demand of the layers after layer, following
// the MoE-Infinity paper. It takes the k best matches of partial over layers
// [0, layer] (k is clamped to Len) and drops those with similarity <= 0, so
// a stored EAM that shares nothing with partial contributes nothing. For
// every future layer i in (layer, Layers) it sums the matched EAMs' rows i
// (unweighted: every kept match counts equally), normalises the summed row
// to sum 1 (an all-zero row stays zero) and multiplies it by the
// layer-proximity weight 1 - (i-layer)/Layers, so nearer layers get higher
// priority.
//
// The result is a Layers x Experts matrix of dimensionless priorities in
// [0, 1); rows 0..layer are zero. Predict returns nil if k <= 0, layer is
// outside [0, Layers), partial is nil, malformed or of another shape, the
// collection is empty, or no stored EAM has positive similarity. For
// layer = Layers-1 (no future layers) it returns an all-zero matrix when a
// positive match exists.
func (c *Collection) Predict(partial *EAM, layer int, k int) *EAM {
	raw := c.PredictRaw(partial, layer, k)
	if raw == nil {
		return nil
	}
	L := float64(c.layers)
	for i := layer + 1; i < c.layers; i++ {
		row := raw.Counts[i*c.experts : (i+1)*c.experts]
		var total float64
		for _, v := range row {
			total += float64(v)
		}
		if total == 0 {
			continue
		}
		w := 1 - float64(i-layer)/L
		for e, v := range row {
			row[e] = float32(float64(v) / total * w)
		}
	}
	return raw
}

// PredictRaw is Predict before normalisation and weighting: for each layer
// after `layer`, the summed token counts of the k best matches (so a
// caller can see how much evidence a prediction rests on). Rows up to
// `layer` are zero; nil when nothing matches.
func (c *Collection) PredictRaw(partial *EAM, layer int, k int) *EAM {
	if layer < 0 || layer >= c.layers {
		return nil
	}
	return c.predictRows(partial, layer, layer+1, k)
}

// PredictRawAll is PredictRaw matched on every layer of partial and
// predicting every layer: the next pass (token) of a request whose current
// pass is complete.
func (c *Collection) PredictRawAll(partial *EAM, k int) *EAM {
	return c.predictRows(partial, c.layers-1, 0, k)
}

// predictRows sums the k best matches on rows 0..layer into rows from..L-1.
func (c *Collection) predictRows(partial *EAM, layer, from int, k int) *EAM {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.sumRowsLocked(c.matchLocked(partial, layer, k), from)
}

// sumRowsLocked sums rows from..L-1 of the matched EAMs of ms (sorted best
// first) that have positive similarity; nil when none has. The caller holds
// c.mu and computed ms under the same lock.
func (c *Collection) sumRowsLocked(ms []Match, from int) *EAM {
	for len(ms) > 0 && ms[len(ms)-1].Similarity <= 0 {
		ms = ms[:len(ms)-1] // sorted best first: non-positive ones are at the tail
	}
	if len(ms) == 0 {
		return nil
	}
	out := NewEAM(c.layers, c.experts)
	sum := make([]float64, c.experts)
	for i := from; i < c.layers; i++ {
		clear(sum)
		for _, m := range ms {
			row := c.entries[m.Index].m.Counts[i*c.experts : (i+1)*c.experts]
			for e, v := range row {
				sum[e] += float64(v)
			}
		}
		dst := out.Counts[i*c.experts : (i+1)*c.experts]
		for e, v := range sum {
			dst[e] = float32(v)
		}
	}
	return out
}
