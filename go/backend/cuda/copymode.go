//go:build cuda

package cuda

import (
	"errors"
	"fmt"
	"runtime"
	"sync/atomic"
	"time"
	"unsafe"

	"gorgonia.org/cu"

	"github.com/moe-infinity/moe_infinity/go/backend"
)

// Copy mode (backend.CopyGraphs). A captured layer runs
//
//	moe_publish: routing ids → box (pinned), ++counter[i] → seq[i] (pinned)
//	moe_wait:    until ready[i] >= counter[i] (or copyTimeout)
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

// copyState is copy mode's device and pinned memory.
type copyState struct {
	publish, wait cu.Function
	counter       uint64         // device [maxCopyLayers]uint32: routings published
	ready         uint64         // device [maxCopyLayers]uint32: routings answered
	box           unsafe.Pointer // pinned: [routingIDs]int64 ids, [maxCopyLayers]uint32 seq, uint32 late
	boxDev        uint64
	offs          []int64 // per captured layer: its ids' offset in box
	pairs         []int64
}

func (c *copyState) seq(i int) *uint32 {
	return (*uint32)(unsafe.Add(c.box, routingIDs*8+4*i))
}

func (c *copyState) late() *uint32 {
	return (*uint32)(unsafe.Add(c.box, routingIDs*8+4*maxCopyLayers))
}

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
			if c.publish, err = b.mod.Function("moe_publish"); err != nil {
				return err
			}
			if c.wait, err = b.mod.Function("moe_wait"); err != nil {
				return err
			}
			if c.counter, err = memAlloc(2 * 4 * maxCopyLayers); err != nil {
				return err
			}
			c.ready = c.counter + 4*maxCopyLayers
			if c.box, err = hostAllocMapped(routingIDs*8 + 4*maxCopyLayers + 4); err != nil {
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
		if err := memset32Async(c.counter, 0, 2*maxCopyLayers, b.prefetch); err != nil {
			return err
		}
		if err := streamSync(b.prefetch); err != nil {
			return err
		}
		clear(unsafe.Slice((*uint32)(unsafe.Add(c.box, routingIDs*8)), maxCopyLayers+1))
		c.offs, c.pairs = c.offs[:0], c.pairs[:0]
		return nil
	})
}

// captureCopyWait submits, during a copy-mode capture, the publication of
// captured layer i's routing and the wait for its copies. Runs in do.
func (b *Backend) captureCopyWait(m *mapped, i int, a backend.FFNArgs) error {
	c := m.cp
	P := a.T * a.K
	if i >= maxCopyLayers {
		return fmt.Errorf("backend cuda: a copy-mode capture holds at most %d layers", maxCopyLayers)
	}
	off := m.staged // the ids' place in box, as in the staging buffer
	if err := launch(c.publish, 1, 1, 256, a.Stream,
		a.TopK, uint64(P), c.boxDev+uint64(8*off), c.boxDev+uint64(routingIDs*8+4*i), c.counter+uint64(4*i)); err != nil {
		return fmt.Errorf("launching moe_publish: %w", err)
	}
	if err := launch(c.wait, 1, 1, 32, a.Stream,
		c.counter+uint64(4*i), c.ready+uint64(4*i), uint64(copyTimeout.Nanoseconds()), c.boxDev+uint64(routingIDs*8+4*maxCopyLayers)); err != nil {
		return fmt.Errorf("launching moe_wait: %w", err)
	}
	c.offs = append(c.offs, off)
	c.pairs = append(c.pairs, P)
	return nil
}

// AwaitLayer polls captured layer i's sequence number until a replay
// publishes one newer than the last answered, and returns that layer's
// routing. It spins (yielding the processor between polls): a layer
// waits on the device meanwhile, and each microsecond of reaction is
// a microsecond of the replay.
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
		if n&255 == 255 {
			select {
			case <-stop:
				return nil, 0, backend.ErrClosed
			default:
			}
		}
		runtime.Gosched()
	}
}

// ServeLayer issues each load's copy on the demand stream, then answers
// captured layer i of replay seq. It reports backend.ErrLate (after
// answering, when the copies went well) when some layer gave up waiting
// since the last call.
func (b *Backend) ServeLayer(i int, seq uint64, loads []backend.SlotLoad) error {
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
	var errs []error
	err := b.dev.do(func() error {
		for _, l := range loads {
			if err := b.copyIn(m, l); err != nil {
				errs = append(errs, err)
				break
			}
		}
		// Answered even after a failed copy: the layer must not wait for
		// copies that will not come (it reads what is not mapped in place).
		return memset32Async(c.ready+uint64(4*i), uint32(seq), 1, b.demand)
	})
	m.copyServed[i] = uint32(seq)
	if err := errors.Join(append(errs, err)...); err != nil {
		return err
	}
	if lp := c.late(); atomic.LoadUint32(lp) != 0 {
		atomic.StoreUint32(lp, 0)
		return backend.ErrLate
	}
	return nil
}

// copyIn copies l's expert into its slot on the demand stream under the
// mapped-mode protocol. Runs in do.
func (b *Backend) copyIn(m *mapped, l backend.SlotLoad) error {
	i := l.Layer*b.experts + l.Expert
	if l.Slot < 0 || l.Slot >= b.slots || l.Layer < 0 || l.Expert < 0 || l.Expert >= b.experts || i >= len(b.segs) {
		return fmt.Errorf("backend cuda: load of L%d/E%d into slot %d out of range", l.Layer, l.Expert, l.Slot)
	}
	s := b.demand
	m.tab.Mu.Lock()
	o := m.tab.Unmap(l.Slot)
	m.tab.Mu.Unlock()
	if o >= 0 {
		if err := m.set(s, o, m.tab.Host[o]); err != nil {
			return err
		}
	}
	// Recorded before the replay began (readers of the slot outside copy
	// mode): already complete, so this never holds the copy.
	if err := streamWait(s, b.free[l.Slot]); err != nil {
		return err
	}
	dst := b.arena + uint64(int64(l.Slot)*b.slotSize)
	for _, sg := range b.segs[i] {
		if err := copyHtoD(dst+uint64(sg.off), sg.ptr, sg.n, s); err != nil {
			return fmt.Errorf("copying L%d/E%d into slot %d: %w", l.Layer, l.Expert, l.Slot, err)
		}
	}
	if err := eventRecord(b.ready[l.Slot], s); err != nil {
		return err
	}
	return b.mapSlot(m, l.Slot, l.Layer, l.Expert, s)
}

// freeCopy releases copy mode's memory. Runs in do.
func freeCopy(c *copyState, keep func(error)) {
	if c == nil {
		return
	}
	if c.box != nil {
		keep(hostFree(c.box))
	}
	if c.counter != 0 {
		keep(memFree(c.counter))
	}
}
