//go:build cuda

package cuda

import (
	"errors"
	"fmt"
	"sync/atomic"
	"time"
	"unsafe"

	"gorgonia.org/cu"

	"github.com/moe-infinity/moe_infinity/go/backend"
)

// Copy mode (backend.CopyGraphs). A captured layer runs
//
//	moe_publish_wait: routing ids → box (pinned), ++counter[i] → seq[i]
//	                  (pinned), then until ready[i] >= counter[i] (or copyTimeout)
//	moe_gate_up_swiglu, moe_down over the layer's table
//
// and the engine, polling seq[i], pins the layer's experts and calls
// ServeLayer, which queues on the demand stream: for each miss, the slot's
// old expert back to host memory, the copy, the new expert's table entry;
// then ready[i] = seq (cuMemsetD32Async). The wait is a hint, never a
// dependency for correctness: every table entry always points at valid
// memory, so a layer that gives up waiting reads its misses in place.
const (
	// maxCopyLayers is the most layers one copy-mode capture may hold.
	maxCopyLayers = 1024
	// copyTimeout is how long a replayed layer waits for its copies (GPU
	// time). A layer's copies take at most a few hundred milliseconds
	// (every expert of a layer at ~50 GB/s); past this the engine is
	// taken to be gone and the layer reads its misses in place.
	copyTimeout = 2 * time.Second
)

// Host time of ServeLayer, by part (Backend.PhaseNs).
const (
	serveAll        = iota // the whole call
	serveFirstCopy         // until the first cuMemcpyHtoDAsync has returned
	serveCopyCalls         // in cuMemcpyHtoDAsync calls
	serveTableCalls        // launching moe_answer
	serveEnter             // from the call to inside do
	serveStreamWait        // in cuStreamWaitEvent calls
	servePhases
)

var serveNames = [servePhases]string{"serve_issue", "serve_first_copy", "serve_copy_calls", "serve_answer", "serve_enter", "serve_stream_wait"}

// PhaseNs reports ServeLayer's host time in nanoseconds: in all, until the
// first copy is issued, in copy calls and in the answer's launch.
func (b *Backend) PhaseNs() map[string]int64 {
	out := make(map[string]int64, servePhases+1)
	for p, name := range serveNames {
		out[name] = b.serveNs[p].Load()
	}
	if m := b.m.Load(); m != nil {
		m.capMu.RLock()
		if c := m.cp; c != nil {
			// GPU time replayed layers held their streams waiting for
			// their copies (copies plus the host's reaction).
			out["gpu_wait"] = int64(atomic.LoadUint64(c.waited()) - c.waitBase.Load())
		}
		m.capMu.RUnlock()
	}
	return out
}

// ResetPhases zeroes PhaseNs.
func (b *Backend) ResetPhases() {
	for p := range b.serveNs {
		b.serveNs[p].Store(0)
	}
	if m := b.m.Load(); m != nil {
		m.capMu.RLock()
		if c := m.cp; c != nil {
			c.waitBase.Store(atomic.LoadUint64(c.waited()))
		}
		m.capMu.RUnlock()
	}
}

// copyState is copy mode's device and pinned memory.
type copyState struct {
	publish, answerFn cu.Function
	counter           uint64         // device [maxCopyLayers]uint32: routings published
	ready             uint64         // device [maxCopyLayers]uint32: routings answered
	box               unsafe.Pointer // pinned: [routingIDs]int64 ids, [maxCopyLayers]uint32 seq, uint32 late, (pad), uint64 waited
	boxDev            uint64
	offs              []int64 // per captured layer: its ids' offset in box
	pairs             []int64
	waitBase          atomic.Uint64 // waited() at the last ResetPhases (ns)

	// moe_answer's (address, value) pairs, pinned: per captured layer,
	// room for the table entries of two experts (the one copied in and the
	// one evicted: 2 × MappedLayout.Entries) per expert it can route, at
	// answerOff (in pairs).
	answer    unsafe.Pointer
	answerDev uint64
	answerOff []int64
	answerCap []int

	// The CPU hand-off's mailboxes (copyhand.go), nil until one is asked.
	hand *copyHand
}

func (c *copyState) seq(i int) *uint32 {
	return (*uint32)(unsafe.Add(c.box, routingIDs*8+4*i))
}

func (c *copyState) late() *uint32 {
	return (*uint32)(unsafe.Add(c.box, routingIDs*8+4*maxCopyLayers))
}

// waitedOff is the offset in box of the GPU time replayed layers have
// waited since the capture (ns), which moe_publish_wait writes.
const waitedOff = routingIDs*8 + 4*maxCopyLayers + 8

func (c *copyState) waited() *uint64 { return (*uint64)(unsafe.Add(c.box, waitedOff)) }

// SetCopyMode selects copy mode for the captures that follow.
func (b *Backend) SetCopyMode(on bool) error {
	m := b.m.Load()
	if m == nil {
		return fmt.Errorf("backend cuda: mapped mode is off")
	}
	m.capMu.Lock()
	defer m.capMu.Unlock()
	m.copyNext = on
	return nil
}

// beginCopyCapture makes copy mode's buffers (once) and zeroes the
// counters, after the compute stream's work (a replay of an earlier
// capture may still be reading them). Runs with capMu held for writing.
func (b *Backend) beginCopyCapture(m *mapped) error {
	return b.dev.do(func() error {
		c := m.cp
		if c == nil {
			c = &copyState{}
			var err error
			if c.publish, err = b.mod.Function("moe_publish_wait"); err != nil {
				return err
			}
			if c.answerFn, err = b.mod.Function("moe_answer"); err != nil {
				return err
			}
			// counter, ready, then the wait accumulator (uint64).
			if c.counter, err = memAlloc(2*4*maxCopyLayers + 8); err != nil {
				return err
			}
			c.ready = c.counter + 4*maxCopyLayers
			if c.box, err = hostAllocMapped(waitedOff + 8); err != nil {
				memFree(c.counter)
				return err
			}
			if c.boxDev, err = hostDevicePtr(c.box); err != nil {
				memFree(c.counter)
				hostFree(c.box)
				return err
			}
			m.cp = c
		}
		if cs := m.computeStream(); cs != 0 {
			if err := streamSync(cs); err != nil {
				return err
			}
		}
		if err := memset32Async(c.counter, 0, 2*maxCopyLayers+2, b.prefetch); err != nil {
			return err
		}
		if err := b.beginCopyHand(m, c); err != nil {
			return err
		}
		if err := streamSync(b.prefetch); err != nil {
			return err
		}
		clear(unsafe.Slice((*uint32)(unsafe.Add(c.box, routingIDs*8)), (waitedOff+8-routingIDs*8)/4))
		c.waitBase.Store(0)
		c.offs, c.pairs = c.offs[:0], c.pairs[:0]
		return nil
	})
}

// captureCopyWait submits, during a copy-mode capture, the publication of
// captured layer i's routing (and, with the CPU hand-off, its mailbox) and
// the wait for its copies. It returns the layer's device skip list and
// partial output for its kernels (0 without a mailbox). Runs in do.
func (b *Backend) captureCopyWait(m *mapped, i int, a backend.FFNArgs) (skip, addend uint64, err error) {
	c := m.cp
	P := a.T * a.K
	if i >= maxCopyLayers {
		return 0, 0, fmt.Errorf("backend cuda: a copy-mode capture holds at most %d layers", maxCopyLayers)
	}
	hp, skip, addend := b.captureHand(m, i, a)
	off := m.staged // the ids' place in box, as in the staging buffer
	if err := launch(c.publish, 1, 1, 256, a.Stream,
		a.TopK, uint64(P), c.boxDev+uint64(8*off), c.boxDev+uint64(routingIDs*8+4*i), c.counter+uint64(4*i),
		c.ready+uint64(4*i), uint64(copyTimeout.Nanoseconds()), c.boxDev+uint64(routingIDs*8+4*maxCopyLayers),
		c.counter+8*maxCopyLayers, c.boxDev+waitedOff,
		hp[0], hp[1], hp[2], hp[3], hp[4], hp[5], hp[6], hp[7], hp[8]); err != nil {
		return 0, 0, fmt.Errorf("launching moe_publish_wait: %w", err)
	}
	c.offs = append(c.offs, off)
	c.pairs = append(c.pairs, P)
	return skip, addend, nil
}

// AwaitLayer polls captured layer i's sequence number until a replay
// publishes one newer than the last answered, and returns that layer's
// routing. It spins without yielding (the engine's copy driver has a
// thread of its own): a layer waits on the device meanwhile, and each
// microsecond of reaction is a microsecond of the replay.
func (b *Backend) AwaitLayer(i int, stop <-chan struct{}) ([]int64, uint64, error) {
	m := b.m.Load()
	if m == nil || m.cp == nil || !m.copyMode || i < 0 || i >= len(m.cp.offs) {
		return nil, 0, fmt.Errorf("backend cuda: no copy-mode capture has a layer %d", i)
	}
	c := m.cp
	p := c.seq(i)
	last := m.copyServed[i]
	for n := 0; ; n++ {
		if s := atomic.LoadUint32(p); int32(s-last) > 0 {
			ids := unsafe.Slice((*int64)(unsafe.Add(c.box, 8*c.offs[i])), c.pairs[i])
			return ids, uint64(s), nil
		}
		if n&4095 == 4095 {
			select {
			case <-stop:
				return nil, 0, backend.ErrClosed
			default:
			}
		}
	}
}

// ServeLayer issues each load's copy on the demand stream, then one
// moe_answer launch that updates the table entries of the experts copied
// in and of those they evicted and releases captured layer i of replay
// seq. It reports backend.ErrLate (after answering, when the copies went
// well) when some layer gave up waiting since the last call.
//
// The entries change after the copies, not before: no kernel reads the
// tables between the layer's routing and its answer, since every later
// layer waits behind this one. (A layer that timed out does read them
// meanwhile; it gives up only after copyTimeout, far beyond any copy.)
func (b *Backend) ServeLayer(i int, seq uint64, loads []backend.SlotLoad) error {
	return b.serveLayer(i, seq, loads, nil, nil)
}

// serveLayer is ServeLayer and, with cpu, ServeLayerCPU: the copies are
// queued, then partial is waited for (outside the device's lock), then
// the skip list is written and the answer queued.
func (b *Backend) serveLayer(i int, seq uint64, loads []backend.SlotLoad, cpu []int32, partial func() error) error {
	m := b.m.Load()
	if m == nil || m.cp == nil || !m.copyMode || i < 0 || i >= len(m.cp.offs) {
		return fmt.Errorf("backend cuda: no copy-mode capture has a layer %d", i)
	}
	c := m.cp
	b.mu.Lock()
	closed := b.closed
	b.mu.Unlock()
	if closed {
		return backend.ErrClosed
	}
	m.capMu.RLock()
	defer m.capMu.RUnlock()
	var copyErr, perr error
	if most := c.answerCap[i] / (2 * m.tab.Lay.Entries()); len(loads) > most { // cannot happen: distinct routed experts
		copyErr = fmt.Errorf("backend cuda: %d loads for captured layer %d, which routes at most %d experts", len(loads), i, most)
		loads = loads[:most]
	}
	t0 := time.Now()
	// Entries to write: the pinned area of layer i is free again, as the
	// last answer that read it ran before this routing was published.
	pairs := unsafe.Slice((*uint64)(unsafe.Add(c.answer, 16*c.answerOff[i])), 2*c.answerCap[i])
	n := 0
	var done []backend.SlotLoad
	copies := func() {
		b.serveNs[serveEnter].Add(int64(time.Since(t0)))
		put := func(i, j int, v uintptr) {
			pairs[2*n], pairs[2*n+1] = m.entry(i, j), uint64(v)
			n++
		}
		for k, l := range loads {
			o, err := b.copyIn(m, l, k == 0, t0)
			if o >= 0 { // back to host memory, even after a failed (partial) copy
				for j, r := range m.tab.Host[o][:m.tab.Lay.Entries()] {
					put(o, j, r)
				}
			}
			if err != nil {
				copyErr = err
				break
			}
			rows := b.slotRows(m, l.Slot)
			for j, r := range rows[:m.tab.Lay.Entries()] {
				put(l.Layer*b.experts+l.Expert, j, r)
			}
			done = append(done, l)
		}
	}
	// Answered even after a failed copy or partial: the layer must not
	// wait for what will not come (it reads what is not mapped in place).
	answer := func() error {
		t := time.Now()
		if n == 0 {
			return memset32Async(c.ready+uint64(4*i), uint32(seq), 1, b.demand)
		}
		err := launch(c.answerFn, 1, 1, 128, b.demand,
			c.answerDev+uint64(16*c.answerOff[i]), uint64(n), c.ready+uint64(4*i), seq)
		b.serveNs[serveTableCalls].Add(int64(time.Since(t)))
		if err != nil {
			return fmt.Errorf("launching moe_answer: %w", err)
		}
		for _, l := range done {
			if err := eventRecord(m.installed[l.Slot], b.demand); err != nil {
				return err
			}
			m.tab.Mu.Lock()
			m.tab.Map(l.Slot, l.Layer*b.experts+l.Expert)
			m.tab.Mu.Unlock()
		}
		return nil
	}
	var err, aerr error
	if len(cpu) == 0 {
		// Nothing for the CPU: the skip list is cleared (host memory) and
		// the copies and the answer go in one device call, as without a
		// hand-off.
		perr = b.handSkip(m, i, nil, true)
		err = b.dev.do(func() error {
			copies()
			return answer()
		})
	} else {
		// The copies, then the CPU's partial while they run (outside the
		// device's lock), its skip list, and the answer in a second call.
		err = b.dev.do(func() error {
			copies()
			return nil
		})
		if partial == nil {
			perr = fmt.Errorf("backend cuda: experts %v of captured layer %d handed to the CPU without a partial", cpu, i)
		} else {
			perr = partial()
		}
		if herr := b.handSkip(m, i, cpu, perr == nil); herr != nil && perr == nil {
			perr = herr
		}
		aerr = b.dev.do(answer)
	}
	m.copyServed[i] = uint32(seq)
	b.serveNs[serveAll].Add(int64(time.Since(t0)))
	if err := errors.Join(perr, copyErr, err, aerr); err != nil {
		return err
	}
	if lp := c.late(); atomic.LoadUint32(lp) != 0 {
		atomic.StoreUint32(lp, 0)
		return backend.ErrLate
	}
	return nil
}

// slotRows are the table entries of an expert copied into slot.
func (b *Backend) slotRows(m *mapped, slot int) backend.HostRows {
	return m.tab.Lay.SlotRows(uintptr(b.arena + uint64(int64(slot)*b.slotSize)))
}

// copyIn unmaps l's slot in the host-side table and queues the copy of
// l's expert into it on the demand stream; it returns the expert the slot
// held (-1 for none), whose device entries the caller points back at host
// memory (also when the copy failed). first: time the first copy's issue
// from t0. Runs in do.
func (b *Backend) copyIn(m *mapped, l backend.SlotLoad, first bool, t0 time.Time) (int, error) {
	i := l.Layer*b.experts + l.Expert
	if l.Slot < 0 || l.Slot >= b.slots || l.Layer < 0 || l.Expert < 0 || l.Expert >= b.experts || i >= len(b.segs) {
		return -1, fmt.Errorf("backend cuda: load of L%d/E%d into slot %d out of range", l.Layer, l.Expert, l.Slot)
	}
	m.tab.Mu.Lock()
	o := m.tab.Unmap(l.Slot)
	m.tab.Mu.Unlock()
	s := b.demand
	// Recorded before the replay began (readers of the slot outside copy
	// mode): already complete, so this never holds the copy, and once
	// known complete it costs no driver call.
	tw := time.Now()
	if err := b.waitFree(l.Slot, s); err != nil {
		return o, err
	}
	b.serveNs[serveStreamWait].Add(int64(time.Since(tw)))
	dst := b.arena + uint64(int64(l.Slot)*b.slotSize)
	for _, sg := range b.segs[i] {
		t := time.Now()
		if err := copyHtoD(dst+uint64(sg.off), sg.ptr, sg.n, s); err != nil {
			return o, fmt.Errorf("copying L%d/E%d into slot %d: %w", l.Layer, l.Expert, l.Slot, err)
		}
		now := time.Now()
		b.serveNs[serveCopyCalls].Add(int64(now.Sub(t)))
		if first {
			b.serveNs[serveFirstCopy].Add(int64(now.Sub(t0)))
			first = false
		}
	}
	return o, eventRecord(b.ready[l.Slot], s)
}

// endCopyCapture sizes the answers' pinned area for the captured layers
// (E experts per layer). Runs with capMu held for writing.
func (b *Backend) endCopyCapture(m *mapped) error {
	c := m.cp
	c.answerOff, c.answerCap = c.answerOff[:0], c.answerCap[:0]
	var total int64
	for _, p := range c.pairs {
		n := 2 * m.tab.Lay.Entries() * int(min(p, int64(m.tab.Experts))) // entries of the experts loaded and evicted
		c.answerOff = append(c.answerOff, total)
		c.answerCap = append(c.answerCap, n)
		total += int64(n)
	}
	return b.dev.do(func() error {
		if c.answer != nil {
			if err := hostFree(c.answer); err != nil {
				return err
			}
			c.answer = nil
		}
		var err error
		if c.answer, err = hostAllocMapped(max(16*total, 16)); err != nil {
			return err
		}
		c.answerDev, err = hostDevicePtr(c.answer)
		return err
	})
}

// freeCopy releases copy mode's memory. Runs in do.
func freeCopy(c *copyState, keep func(error)) {
	if c == nil {
		return
	}
	if c.answer != nil {
		keep(hostFree(c.answer))
	}
	if c.hand != nil {
		keep(freeHand(c.hand))
	}
	if c.box != nil {
		keep(hostFree(c.box))
	}
	if c.counter != 0 {
		keep(memFree(c.counter))
	}
}
