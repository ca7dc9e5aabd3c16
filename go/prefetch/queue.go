// Package prefetch turns predictions of future expert use into an ordered
// queue of loads: a Planner predicts from the EAM collection (and from
// router hints), a Queue orders the candidates by score, merges the plans
// of concurrent requests and cancels what a newer plan no longer wants.
package prefetch

import (
	"container/heap"
	"sort"
	"sync"
	"sync/atomic"

	"github.com/moe-infinity/moe_infinity/go/cache"
)

// Candidate is one expert worth loading ahead of demand.
type Candidate struct {
	// Key is the expert.
	Key cache.Key
	// Score is the predicted usefulness (higher loads first). EAM
	// predictions lie in [0, 1]; router hints score above 1.
	Score float64
}

// entry is one planned expert. Its score is the maximum over the owners'
// scores. It stays in the plan after being popped (queued == false) so that
// Score keeps protecting it from eviction by weaker prefetches.
type entry struct {
	key    cache.Key
	score  float64
	owners map[uint64]float64
	queued bool
	index  int // position in the heap while queued
}

type entryHeap []*entry

func (h entryHeap) Len() int { return len(h) }
func (h entryHeap) Less(i, j int) bool {
	return better(Candidate{h[i].key, h[i].score}, Candidate{h[j].key, h[j].score})
}

// better orders candidates: higher score first, then earlier layer, then
// lower expert index, so that the order is deterministic.
func better(a, b Candidate) bool {
	if a.Score != b.Score {
		return a.Score > b.Score
	}
	if a.Key.Layer != b.Key.Layer {
		return a.Key.Layer < b.Key.Layer
	}
	return a.Key.Expert < b.Key.Expert
}
func (h entryHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].index = i
	h[j].index = j
}
func (h *entryHeap) Push(x any) {
	e := x.(*entry)
	e.index = len(*h)
	*h = append(*h, e)
}
func (h *entryHeap) Pop() any {
	old := *h
	e := old[len(old)-1]
	old[len(old)-1] = nil
	*h = old[:len(old)-1]
	e.index = -1
	return e
}

// Queue is a priority queue of prefetch candidates with per-owner plans.
// An owner is typically one request (or the router-hint source); each
// Update replaces everything that owner planned before, which cancels the
// stale part of its plan. Safe for concurrent use.
type Queue struct {
	mu      sync.Mutex
	plan    map[cache.Key]*entry
	planned atomic.Int64                      // len(plan), for Score without the lock
	byOwner map[uint64]map[cache.Key]struct{} // the keys each owner planned
	heap    entryHeap
	notify  chan struct{}
	closed  bool
	cancels uint64
	taken   int // popped candidates whose handling has not finished (Done)
}

// NewQueue returns an empty queue.
func NewQueue() *Queue {
	return &Queue{plan: make(map[cache.Key]*entry), byOwner: make(map[uint64]map[cache.Key]struct{}), notify: make(chan struct{})}
}

func (q *Queue) wakeLocked() {
	close(q.notify)
	q.notify = make(chan struct{})
}

// Update replaces owner's plan with cands (nil cancels it). Candidates with
// a non-positive score are ignored; duplicates keep the higher score.
func (q *Queue) Update(owner uint64, cands []Candidate) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return
	}
	want := make(map[cache.Key]float64, len(cands))
	for _, c := range cands {
		if c.Score > 0 && c.Score > want[c.Key] {
			want[c.Key] = c.Score
		}
	}
	// Drop or lower what the owner no longer wants (only its own keys are
	// visited, so an update costs the size of the owner's plans, not of
	// every owner's).
	mine := q.byOwner[owner]
	for k := range mine {
		if _, keep := want[k]; keep {
			continue
		}
		delete(mine, k)
		if e, ok := q.plan[k]; ok {
			delete(e.owners, owner)
			q.rescoreLocked(e)
		}
	}
	if len(want) == 0 {
		delete(q.byOwner, owner)
		return
	}
	if mine == nil {
		mine = make(map[cache.Key]struct{}, len(want))
		q.byOwner[owner] = mine
	}
	added := false
	for k, s := range want {
		mine[k] = struct{}{}
		e, ok := q.plan[k]
		if !ok {
			e = &entry{key: k, owners: make(map[uint64]float64, 1), index: -1}
			q.plan[k] = e
			q.planned.Store(int64(len(q.plan)))
			e.queued = true
			e.owners[owner] = s
			e.score = s
			heap.Push(&q.heap, e)
			added = true
			continue
		}
		e.owners[owner] = s
		q.rescoreLocked(e)
	}
	if added {
		q.wakeLocked()
	}
}

// rescoreLocked recomputes e's score from its owners and removes it when no
// owner is left.
func (q *Queue) rescoreLocked(e *entry) {
	if len(e.owners) == 0 {
		if e.queued {
			heap.Remove(&q.heap, e.index)
			e.queued = false
			q.cancels++
		}
		delete(q.plan, e.key)
		q.planned.Store(int64(len(q.plan)))
		return
	}
	best := 0.0
	for _, s := range e.owners {
		if s > best {
			best = s
		}
	}
	e.score = best
	if e.queued {
		heap.Fix(&q.heap, e.index)
	}
}

// Cancel removes k from the queue (it stays known to Score until its
// owners replan). It reports whether k was queued.
func (q *Queue) Cancel(k cache.Key) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	e, ok := q.plan[k]
	if !ok || !e.queued {
		return false
	}
	heap.Remove(&q.heap, e.index)
	e.queued = false
	q.cancels++
	return true
}

// TryPop removes and returns the best queued candidate, if any (see Done).
func (q *Queue) TryPop() (Candidate, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.popLocked()
}

func (q *Queue) popLocked() (Candidate, bool) {
	if len(q.heap) == 0 {
		return Candidate{}, false
	}
	e := heap.Pop(&q.heap).(*entry)
	e.queued = false
	q.taken++
	return Candidate{Key: e.key, Score: e.score}, true
}

// Done marks the handling of one popped candidate as finished (its load
// completed or it was dropped). Every successful Pop or TryPop must be
// matched by one Done for Idle to become true.
func (q *Queue) Done() {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.taken > 0 {
		q.taken--
	}
}

// Idle reports whether nothing is queued and every popped candidate is
// Done.
func (q *Queue) Idle() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.heap) == 0 && q.taken == 0
}

// Pop blocks until a candidate is queued and returns the best one (see
// Done). It
// returns ok=false when stop is closed or the queue is closed.
func (q *Queue) Pop(stop <-chan struct{}) (Candidate, bool) {
	for {
		q.mu.Lock()
		if q.closed {
			q.mu.Unlock()
			return Candidate{}, false
		}
		if c, ok := q.popLocked(); ok {
			q.mu.Unlock()
			return c, true
		}
		ch := q.notify
		q.mu.Unlock()
		select {
		case <-ch:
		case <-stop:
			return Candidate{}, false
		}
	}
}

// Requeue puts a popped candidate back (for example when no slot could be
// reserved for it yet) if it is still planned.
func (q *Queue) Requeue(k cache.Key) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if e, ok := q.plan[k]; ok && !e.queued && !q.closed {
		e.queued = true
		heap.Push(&q.heap, e)
	}
}

// Score returns k's current planned score (0 when unplanned), whether or
// not it is still queued.
func (q *Queue) Score(k cache.Key) float64 {
	if q.planned.Load() == 0 { // no plans (copy mode clears them): no lock
		return 0
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	if e, ok := q.plan[k]; ok {
		return e.score
	}
	return 0
}

// Len returns the number of queued candidates.
func (q *Queue) Len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.heap)
}

// Queued returns the queued candidates, best first (for tests and stats).
func (q *Queue) Queued() []Candidate {
	q.mu.Lock()
	defer q.mu.Unlock()
	out := make([]Candidate, 0, len(q.heap))
	for _, e := range q.heap {
		out = append(out, Candidate{Key: e.key, Score: e.score})
	}
	sort.Slice(out, func(i, j int) bool { return better(out[i], out[j]) })
	return out
}

// Cancellations returns how many queued candidates were cancelled so far.
func (q *Queue) Cancellations() uint64 {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.cancels
}

// Clear drops every plan and queued candidate (popped ones still get
// their Done).
func (q *Queue) Clear() {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.cancels += uint64(len(q.heap))
	q.heap = nil
	q.plan = map[cache.Key]*entry{}
	q.planned.Store(0)
	q.byOwner = map[uint64]map[cache.Key]struct{}{}
}

// Close empties the queue and wakes every Pop with ok=false.
func (q *Queue) Close() {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return
	}
	q.closed = true
	q.heap = nil
	q.plan = map[cache.Key]*entry{}
	q.planned.Store(0)
	q.byOwner = map[uint64]map[cache.Key]struct{}{}
	q.wakeLocked()
}
