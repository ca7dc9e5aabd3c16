package engine

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/moe-infinity/moe_infinity/go/backend"
	"github.com/moe-infinity/moe_infinity/go/cache"
)

// mappedQueue is the most launched layers whose routing may wait for the
// tracer; LayerMapped blocks beyond it (the backend's routing ring bounds
// it as well).
const mappedQueue = 1024

// mappedItem is one mapped launch (or one graph replay of several) whose
// routing the tracer has yet to read.
type mappedItem struct {
	layers []backend.CapturedLayer
	reqs   []uint64
	r      *backend.Routing
	served bool // a copy-mode replay: the copy driver counted and loaded its experts
	handed bool // a copy-mode replay whose layers have hand-off mailboxes
}

// mappedState is the engine side of mapped mode: the tracer goroutine that
// turns each launch's routing, once on the host, into tracing, cache
// statistics, admissions and prefetch plans, off the compute path.
type mappedState struct {
	once sync.Once
	err  error
	q    chan mappedItem

	mu       sync.Mutex
	idle     *sync.Cond
	pending  int   // items queued or being traced
	asyncErr error // the first error the tracer met, returned by the next call

	capturing bool
	captured  []backend.CapturedLayer // the layers of the last capture
	copyNext  bool                    // the capture in progress is in copy mode
	copied    bool                    // the last capture is in copy mode
	handNext  bool                    // the capture in progress has hand-off mailboxes
	handed    bool                    // the last capture has them
	warmT     atomic.Int64            // the most tokens of a mapped layer call since the last capture

	// The copy driver's (copymode.go): replays to serve, the sequence
	// number last answered per captured layer, scratch, and the layers
	// that stopped waiting for it.
	copyQ  chan mappedItem
	served []uint64
	seen   []bool
	keys   []cache.Key
	late   atomic.Int64
}

// enableMapped turns the backend's mapped mode on once.
func (e *Engine) enableMapped() (backend.Mapped, error) {
	mb := e.ft.Mapped
	if mb == nil {
		return nil, fmt.Errorf("%w: %w: backend %s has no mapped mode", ErrUnsupported, errMappedUnavailable, e.be.Name())
	}
	m := &e.mapped
	m.once.Do(func() {
		if _, _, _, err := e.FFNShape(); err != nil {
			m.err = fmt.Errorf("%w: %w", errMappedUnavailable, err)
			return
		}
		if err := mb.EnableMapped(e.kl); err != nil {
			m.err = fmt.Errorf("%w: %w: %v", ErrUnsupported, errMappedUnavailable, err)
			return
		}
		m.idle = sync.NewCond(&m.mu)
		m.q = make(chan mappedItem, mappedQueue)
		e.bg.Add(1)
		go e.tracer()
		if cg := e.copyGraphs(); cg != nil {
			m.copyQ = make(chan mappedItem, mappedQueue)
			e.bg.Add(1)
			go e.copyDriver(cg)
		}
	})
	if m.err != nil {
		return nil, m.err
	}
	return mb, nil
}

// LayerMapped computes one MoE layer without waiting for anything: the
// backend's kernels read resident experts from their slots and the others
// from host memory, and the routing (c.TopK, on the device) reaches the
// tracer asynchronously. reqs are the requests the layer's tokens belong
// to (split evenly in row order, as in Layer). An error the tracer met
// on an earlier call (an out-of-range expert id, whose pairs the
// computation skipped) is returned here, or at the latest by EndRequest.
func (e *Engine) LayerMapped(c FFNCall, reqs []uint64) error {
	if err := e.enter(); err != nil {
		return err
	}
	defer e.ops.Done()
	mb, err := e.enableMapped()
	if err != nil {
		return err
	}
	if err := e.takeMappedErr(); err != nil {
		return err
	}
	if c.Layer < 0 || c.Layer >= e.layers {
		return fmt.Errorf("%w: layer %d out of range [0, %d)", ErrInvalid, c.Layer, e.layers)
	}
	hidden, inter, dt, err := e.FFNShape()
	if err != nil {
		return err
	}
	if err := checkActivations(c, dt); err != nil {
		return err
	}
	if err := e.checkLayer(c.Layer); err != nil {
		return err
	}
	if w := &e.mapped.warmT; e.hybrid.k != nil && c.T > w.Load() {
		w.Store(c.T) // sizes the graph hand-off's mailbox; a race between callers only sizes it
	}
	t0 := time.Now()
	r, err := mb.MappedFFN(c.Layer, backend.FFNArgs{
		Stream: c.Stream, X: c.X, Out: c.Out, Scratch: c.Scratch, TopK: c.TopK, Weights: c.Weights,
		T: c.T, K: c.K, Hidden: hidden, Inter: inter, DType: dt, WDType: c.WDType, FP8: e.fp8, GptOss: e.gptoss,
	})
	e.phase(phaseKernels, t0)
	if err != nil {
		return fmt.Errorf("expert FFN of layer %d: %w", c.Layer, err)
	}
	if r == nil { // captured: GraphStep traces each replay
		return nil
	}
	return e.enqueueMapped(mappedItem{layers: []backend.CapturedLayer{{Layer: c.Layer, Pairs: c.T * c.K, K: c.K}}, reqs: append([]uint64(nil), reqs...), r: r})
}

func (e *Engine) enqueueMapped(it mappedItem) error { return e.enqueueTo(e.mapped.q, it) }

// enqueueTo queues it on q (the tracer's or the copy driver's), counted
// as pending until the tracer is done with it.
func (e *Engine) enqueueTo(q chan mappedItem, it mappedItem) error {
	m := &e.mapped
	m.mu.Lock()
	m.pending++
	m.mu.Unlock()
	select {
	case q <- it:
		return nil
	case <-e.stop:
		it.r.Done()
		e.mappedDone(nil)
		return ErrClosed
	}
}

// CaptureBegin prepares a CUDA graph capture of mapped layers (the caller
// then captures a decode step on one stream): copies wait until
// CaptureEnd, so that no table update joins the graph, and each layer's
// routing is staged on the device for GraphStep.
func (e *Engine) CaptureBegin() error {
	if err := e.readyLocked(); err != nil {
		return err
	}
	if _, err := e.enableMapped(); err != nil {
		return err
	}
	g := e.ft.Graphs
	if g == nil {
		return fmt.Errorf("%w: backend %s cannot capture graphs", ErrUnsupported, e.be.Name())
	}
	e.drainMapped()
	m := &e.mapped
	copyNext := e.graphMissesNow() == "copy"
	m.mu.Lock()
	if m.capturing {
		m.mu.Unlock()
		return fmt.Errorf("%w: a capture is already in progress", ErrState)
	}
	m.capturing = true
	m.copyNext = copyNext
	m.mu.Unlock()
	if cg := e.copyGraphs(); cg == nil && copyNext {
		m.mu.Lock()
		m.capturing = false
		m.mu.Unlock()
		return fmt.Errorf("%w: graph_misses \"copy\": backend %s cannot copy misses inside a replay", ErrUnsupported, e.be.Name())
	} else if cg != nil {
		if err := cg.SetCopyMode(copyNext); err != nil {
			m.mu.Lock()
			m.capturing = false
			m.mu.Unlock()
			return err
		}
	}
	if err := e.setCaptureHandOff(copyNext); err != nil {
		m.mu.Lock()
		m.capturing = false
		m.mu.Unlock()
		return err
	}
	if err := g.BeginCapture(); err != nil {
		m.mu.Lock()
		m.capturing = false
		m.mu.Unlock()
		return err
	}
	return nil
}

// CaptureEnd ends the capture and returns how many MoE layers it holds.
func (e *Engine) CaptureEnd() (int, error) {
	if err := e.readyLocked(); err != nil {
		return 0, err
	}
	g := e.ft.Graphs
	ok := g != nil
	m := &e.mapped
	m.mu.Lock()
	defer m.mu.Unlock()
	if !ok || !m.capturing {
		return 0, fmt.Errorf("%w: no capture in progress", ErrState)
	}
	m.capturing = false
	layers, err := g.EndCapture()
	if err != nil {
		return 0, err
	}
	m.captured = layers
	m.copied = m.copyNext
	m.handed = m.copyNext && m.handNext
	m.warmT.Store(0)
	m.served = make([]uint64, len(layers))
	return len(layers), nil
}

// GraphStep traces one replay of the captured step (submitted to stream
// just before) for reqs: its routing is copied to the host after the
// replay and traced asynchronously, like LayerMapped's.
func (e *Engine) GraphStep(stream uintptr, reqs []uint64) error {
	if err := e.enter(); err != nil {
		return err
	}
	defer e.ops.Done()
	if err := e.takeMappedErr(); err != nil {
		return err
	}
	g := e.ft.Graphs
	ok := g != nil
	m := &e.mapped
	m.mu.Lock()
	layers, capturing, copied, handed := m.captured, m.capturing, m.copied, m.handed
	m.mu.Unlock()
	if !ok || len(layers) == 0 || capturing {
		return fmt.Errorf("%w: no captured step to trace", ErrState)
	}
	// A replay has no per-layer host call: the checkpoint's files are
	// checked once per step, here.
	if err := e.ckpt.CheckFiles(e.allFiles); err != nil {
		return err
	}
	r, err := g.ReplayRouting(stream, layers)
	if err != nil {
		return err
	}
	it := mappedItem{layers: layers, reqs: append([]uint64(nil), reqs...), r: r, served: copied, handed: handed}
	if copied {
		// Prefetch loads order their copies after the compute stream's
		// work, which a served replay holds until its copies are done:
		// none are planned while served replays run.
		e.queue.Clear()
		return e.enqueueTo(m.copyQ, it)
	}
	return e.enqueueMapped(it)
}

func (e *Engine) takeMappedErr() error {
	m := &e.mapped
	m.mu.Lock()
	defer m.mu.Unlock()
	err := m.asyncErr
	m.asyncErr = nil
	return err
}

// drainMapped waits until the tracer has read every launched layer's
// routing (before requests end, statistics are read or the cache is
// flushed).
func (e *Engine) drainMapped() {
	m := &e.mapped
	if m.idle == nil {
		return
	}
	m.mu.Lock()
	for m.pending > 0 {
		m.idle.Wait()
	}
	m.mu.Unlock()
}

// tracer reads each launch's routing in order and accounts it.
func (e *Engine) tracer() {
	defer e.bg.Done()
	m := &e.mapped
	for {
		var it mappedItem
		select {
		case it = <-m.q:
		case <-e.stop:
			for {
				select {
				case it := <-m.q:
					it.r.Done()
					e.mappedDone(nil)
				default:
					return
				}
			}
		}
		err := e.traceMapped(it)
		it.r.Done()
		e.mappedDone(err)
	}
}

func (e *Engine) mappedDone(err error) {
	m := &e.mapped
	m.mu.Lock()
	if err != nil && m.asyncErr == nil && !errors.Is(err, ErrClosed) {
		m.asyncErr = err
	}
	m.pending--
	if m.pending == 0 {
		m.idle.Broadcast()
	}
	m.mu.Unlock()
}

// traceMapped accounts one launch, each layer through the core in the
// order every path and go/sim share (core.Layer): tracing, then the use —
// hits and misses against the residency the kernels saw, bytes read over
// the link, and the admissions of the missed experts the policy wants
// cached (core.UseInPlace, all decided before any of their copies starts)
// — then the prefetch plan; the admitted experts are copied last.
func (e *Engine) traceMapped(it mappedItem) error {
	all, err := it.r.Wait()
	if err != nil {
		return fmt.Errorf("routing of layer %d: %w", it.layers[0].Layer, err)
	}
	// The tracer's own host time: from the routing's arrival, less waits
	// for room in the prefetch window.
	t0 := time.Now()
	var waited time.Duration
	defer func() { e.phaseNs[phaseTrace].Add(int64(time.Since(t0) - waited)) }()
	var off int64
	for li, l := range it.layers {
		ids := all[off : off+l.Pairs]
		off += l.Pairs
		experts, counts, err := e.routingCounts(l.Layer, ids, l.K, it.reqs, false)
		if err != nil {
			return err
		}
		if len(it.reqs) > 0 {
			if err := e.checkObserve(l.Layer, it.reqs, counts); err != nil {
				return err
			}
		}
		var admitted []cache.Grant
		use := func() error {
			if it.served {
				return nil // the copy driver counted and loaded this layer
			}
			resident := it.r.Resident[li*e.experts : (li+1)*e.experts]
			keys := make([]cache.Key, len(experts))
			hits := make([]bool, len(experts))
			misses := 0
			for i, x := range experts {
				keys[i] = cache.Key{Layer: int32(l.Layer), Expert: x}
				hits[i] = resident[x]
				if !hits[i] {
					misses++
				}
			}
			e.bytesMoved[l.Layer].Add(int64(misses) * e.lay.SlotBytes)
			admitted = e.core.UseInPlace(keys, hits, *e.cfg.AdmitMargin, -1)
			return nil
		}
		if len(it.layers) == 1 {
			_, err = e.core.Layer(l.Layer, it.reqs, counts, use)
		} else {
			// A replayed step's layers all ran already: plan once, below,
			// for the next step, rather than for layers that are over.
			err = e.core.LayerReplayed(l.Layer, it.reqs, counts, use)
		}
		if err != nil {
			return routingErr(err)
		}
		for _, g := range admitted {
			waited += e.admit(g)
		}
	}
	if len(it.layers) > 1 && !it.served {
		e.core.PlanNext(it.reqs)
	}
	return nil
}

// admit copies an admitted expert (its slot reserved by core.UseInPlace)
// as a low-priority copy within the prefetch window (the tracer waits for
// room in it: copies in flight are bounded and the compute path, which
// never waits for the tracer until the routing ring is full, is
// unaffected).
func (e *Engine) admit(g cache.Grant) (waited time.Duration) {
	t0 := time.Now()
	select {
	case e.prefSem <- struct{}{}:
	case <-e.stop:
		e.cache.Complete(g.Slot, g.Gen, ErrClosed)
		return time.Since(t0)
	}
	waited = time.Since(t0)
	k := g.Key
	tr := e.be.Load(g.Slot, int(k.Layer), int(k.Expert), false)
	e.bg.Add(1)
	go func() {
		defer e.bg.Done()
		err := tr.Err()
		e.cache.Complete(g.Slot, g.Gen, err)
		<-tr.Finished()
		if err == nil {
			e.bytesMoved[k.Layer].Add(e.lay.SlotBytes)
		}
		<-e.prefSem
	}()
	return waited
}

// routingCounts validates a layer's routing (T·K ids) and returns its
// distinct experts in ascending order and, per request, the tokens routed
// to each expert (tokens split evenly between reqs in row order, or
// shared equally when they do not divide). With gaps, an id of
// RoutingGap is an empty place (no expert) and counts for nothing.
func (e *Engine) routingCounts(layer int, ids []int64, K int64, reqs []uint64, gaps bool) ([]int32, [][]float32, error) {
	E := e.experts
	e.planner.SetTopK(int(K)) // the routing tells the planner k
	seen := make([]bool, E)
	var counts [][]float32
	R := int64(len(reqs))
	if R > 0 {
		counts = make([][]float32, R)
		for i := range counts {
			counts[i] = make([]float32, E)
		}
	}
	T := int64(len(ids)) / K
	per := int64(0)
	if R > 0 && T%R == 0 {
		per = T / R
	}
	n := 0
	for p, x := range ids {
		if gaps && x == RoutingGap {
			continue
		}
		if x < 0 || x >= int64(E) {
			return nil, nil, fmt.Errorf("%w: layer %d: token %d routes to expert %d, out of range [0, %d)", ErrInvalid, layer, int64(p)/K, x, E)
		}
		if !seen[x] {
			seen[x] = true
			n++
		}
		switch {
		case R == 0:
		case per > 0:
			counts[int64(p)/K/per][x]++
		default:
			for r := range counts {
				counts[r][x] += 1 / float32(R)
			}
		}
	}
	experts := make([]int32, 0, n)
	for x, s := range seen {
		if s {
			experts = append(experts, int32(x))
		}
	}
	return experts, counts, nil
}
