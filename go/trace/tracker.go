package trace

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
)

// ErrUnknownRequest is returned (wrapped) by Tracker methods given a request
// id that was never returned by Begin or has already ended.
var ErrUnknownRequest = errors.New("trace: unknown request")

// live is the EAM of one in-flight request with its own lock, so that
// Observe calls for different requests proceed in parallel.
type live struct {
	mu   sync.Mutex
	m    *EAM
	done bool    // set by End/Abort; later Observe calls fail
	mt   matcher // incremental match state of m (matcher.go)
}

// Tracker holds the live EAMs of in-flight requests and the collection they
// retire into. Safe for concurrent use: Observe calls for different
// requests do not contend with each other beyond a shared read lock.
type Tracker struct {
	coll *Collection
	next atomic.Uint64

	mu   sync.RWMutex
	reqs map[uint64]*live
}

// NewTracker returns a tracker whose requests have coll's shape and retire
// into coll. It panics if coll is nil.
func NewTracker(coll *Collection) *Tracker {
	if coll == nil {
		panic("trace: NewTracker with nil collection")
	}
	return &Tracker{coll: coll, reqs: make(map[uint64]*live)}
}

// Collection returns the collection that ended requests retire into.
func (t *Tracker) Collection() *Collection { return t.coll }

// Begin starts tracking a new request with an all-zero EAM and returns its
// id. Ids are unique for the tracker's lifetime and never 0.
func (t *Tracker) Begin() uint64 {
	id := t.next.Add(1)
	l := &live{m: NewEAM(t.coll.layers, t.coll.experts)}
	t.mu.Lock()
	t.reqs[id] = l
	t.mu.Unlock()
	return id
}

// lookup returns the live state of req or an ErrUnknownRequest error.
func (t *Tracker) lookup(req uint64) (*live, error) {
	t.mu.RLock()
	l, ok := t.reqs[req]
	t.mu.RUnlock()
	if !ok {
		return nil, fmt.Errorf("%w: %d", ErrUnknownRequest, req)
	}
	return l, nil
}

// lockLive returns req's entry locked (the caller unlocks l.mu), or an
// error wrapping ErrUnknownRequest when req is unknown or has ended.
func (t *Tracker) lockLive(req uint64) (*live, error) {
	l, err := t.lookup(req)
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	if l.done {
		l.mu.Unlock()
		return nil, fmt.Errorf("%w: %d (ended)", ErrUnknownRequest, req)
	}
	return l, nil
}

// Observe adds counts (one entry per expert: the number of tokens routed to
// that expert, finite and >= 0) to row layer of req's EAM. Calls accumulate,
// so prefill and every decode step are all counted. It returns an error
// wrapping ErrUnknownRequest for an unknown or ended req, ErrOutOfRange for
// a bad layer, ErrShapeMismatch if len(counts) != Experts and
// ErrInvalidCount for NaN, infinite or negative entries; the EAM is
// unchanged on error.
func (t *Tracker) Observe(req uint64, layer int, counts []float32) error {
	if layer < 0 || layer >= t.coll.layers {
		return fmt.Errorf("%w: layer %d of %d", ErrOutOfRange, layer, t.coll.layers)
	}
	if len(counts) != t.coll.experts {
		return fmt.Errorf("%w: %d counts for %d experts", ErrShapeMismatch, len(counts), t.coll.experts)
	}
	for e, v := range counts {
		if !validCount(v) {
			return fmt.Errorf("%w: %v tokens at (layer %d, expert %d)", ErrInvalidCount, v, layer, e)
		}
	}
	l, err := t.lockLive(req)
	if err != nil {
		return err
	}
	defer l.mu.Unlock()
	row := l.m.Row(layer)
	base := layer * t.coll.experts
	limit := maxPendingFactor * len(l.m.Counts)
	for e, v := range counts {
		if v == 0 {
			continue
		}
		old := row[e]
		row[e] += v
		if row[e] != old {
			l.mt.observe(base+e, old, row[e], limit)
		}
	}
	return nil
}

// Match is Collection().Match of req's live EAM over layers [0, upto],
// computed incrementally: each call only accounts for the counts observed
// since the previous one and for the stored EAMs added or replaced since
// (see matcher.go; for integer counts the result is exactly Match's). It
// returns an error wrapping ErrUnknownRequest for an unknown or ended req.
func (t *Tracker) Match(req uint64, upto, k int) ([]Match, error) {
	var out []Match
	err := t.withMatches(req, upto, k, func(ms []Match) { out = ms })
	return out, err
}

// PredictRaw is Collection().PredictRaw of req's live EAM, matched
// incrementally like Match. A nil matrix with a nil error means nothing
// matches.
func (t *Tracker) PredictRaw(req uint64, layer, k int) (*EAM, error) {
	if layer < 0 || layer >= t.coll.layers {
		if _, err := t.lookup(req); err != nil {
			return nil, err
		}
		return nil, nil
	}
	var out *EAM
	err := t.withMatches(req, layer, k, func(ms []Match) { out = t.coll.sumRowsLocked(ms, layer+1) })
	return out, err
}

// PredictRawAll is Collection().PredictRawAll of req's live EAM (the
// prediction of its next pass), matched incrementally like Match.
func (t *Tracker) PredictRawAll(req uint64, k int) (*EAM, error) {
	var out *EAM
	err := t.withMatches(req, t.coll.layers-1, k, func(ms []Match) { out = t.coll.sumRowsLocked(ms, 0) })
	return out, err
}

// withMatches matches req's live EAM over [0, upto] and calls use with
// the result while still holding the collection's read lock, so that the
// indices stay valid.
func (t *Tracker) withMatches(req uint64, upto, k int, use func([]Match)) error {
	l, err := t.lockLive(req)
	if err != nil {
		return err
	}
	defer l.mu.Unlock()
	t.coll.rlockCols()
	defer t.coll.mu.RUnlock()
	use(t.coll.matchIncLocked(&l.mt, l.m, upto, k))
	return nil
}

// Partial returns a copy of req's live EAM and true, or nil and false if req
// is unknown or has ended.
func (t *Tracker) Partial(req uint64) (*EAM, bool) {
	l, err := t.lockLive(req)
	if err != nil {
		return nil, false
	}
	defer l.mu.Unlock()
	return l.m.Clone(), true
}

// Predict is shorthand for Collection().Predict on a copy of req's live EAM
// (see Collection.Predict for the result). It returns an error wrapping
// ErrUnknownRequest for an unknown req; a nil matrix with a nil error means
// no prediction is possible.
func (t *Tracker) Predict(req uint64, layer, k int) (*EAM, error) {
	p, ok := t.Partial(req)
	if !ok {
		return nil, fmt.Errorf("%w: %d", ErrUnknownRequest, req)
	}
	return t.coll.Predict(p, layer, k), nil
}

// remove detaches req from the tracker and marks it done, returning its EAM.
func (t *Tracker) remove(req uint64) (*EAM, error) {
	t.mu.Lock()
	l, ok := t.reqs[req]
	delete(t.reqs, req)
	t.mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("%w: %d", ErrUnknownRequest, req)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.done = true
	return l.m, nil
}

// End stops tracking req and retires its EAM into the collection (an
// all-zero EAM is dropped, see Collection.Add). It returns an error wrapping
// ErrUnknownRequest for an unknown or already ended req.
func (t *Tracker) End(req uint64) error {
	m, err := t.remove(req)
	if err != nil {
		return err
	}
	return t.coll.Add(m)
}

// Abort stops tracking req without retiring its EAM (for cancelled or
// failed requests). It returns an error wrapping ErrUnknownRequest for an
// unknown or already ended req.
func (t *Tracker) Abort(req uint64) error {
	_, err := t.remove(req)
	return err
}

// Active returns the number of requests begun and not yet ended or aborted.
func (t *Tracker) Active() int {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return len(t.reqs)
}

// LayerTotals returns, summed over all active requests, the per-expert token
// counts of layer (Experts entries) and their plain sum as tokens (a token
// routed to top-k experts is counted k times, since top-k is not known
// here). It returns nil and 0 if layer is out of range.
func (t *Tracker) LayerTotals(layer int) (perExpert []float32, tokens float32) {
	if layer < 0 || layer >= t.coll.layers {
		return nil, 0
	}
	perExpert = make([]float32, t.coll.experts)
	t.mu.RLock()
	defer t.mu.RUnlock()
	for _, l := range t.reqs {
		l.mu.Lock()
		for e, v := range l.m.Row(layer) {
			perExpert[e] += v
		}
		l.mu.Unlock()
	}
	for _, v := range perExpert {
		tokens += v
	}
	return perExpert, tokens
}
