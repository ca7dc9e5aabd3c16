package backend

import (
	"fmt"
	"sync"
	"unsafe"
)

// EnableMapped turns on mapped mode: the reference for the CUDA backend's,
// with the same table protocol (a slot's expert is unmapped before the copy
// into it and the new expert mapped after it).
func (c *CPU) EnableMapped(l MappedLayout) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.opened || c.closed {
		return fmt.Errorf("backend cpu: mapped mode needs an open backend")
	}
	ss, ok := c.src.(SegmentSource)
	if !ok {
		return fmt.Errorf("backend cpu: mapped mode needs a source that describes experts as host memory")
	}
	layers, experts := ss.Shape()
	m, err := NewMapTable(l, c.slots, layers, experts, func(layer, x int) (HostRows, bool) {
		segs, ok := ss.Segments(layer, x)
		if !ok {
			return HostRows{}, false
		}
		return ResolveHostRows(l, segs)
	})
	if err != nil {
		return fmt.Errorf("backend cpu: %w", err)
	}
	c.mapped.Store(m)
	return nil
}

// MappedFFN computes the layer's FFN reading each expert from its slot
// when mapped, else from the source's host memory; synchronous on the CPU.
// FP8 experts (a.FP8, without tables) need a layout with scale grids,
// gpt-oss experts (a.GptOss) a gpt-oss layout: their tables come from the
// same entries as the rows.
func (c *CPU) MappedFFN(layer int, a FFNArgs) (*Routing, error) {
	m := c.mapped.Load()
	if m == nil {
		return nil, fmt.Errorf("backend cpu: mapped mode is off")
	}
	if layer < 0 || layer >= m.Layers {
		return nil, fmt.Errorf("backend cpu: layer %d out of range [0, %d)", layer, m.Layers)
	}
	if a.T <= 0 || a.K <= 0 || a.TopK == 0 {
		return nil, fmt.Errorf("backend cpu: routing of %d × %d ids at %#x", a.T, a.K, a.TopK)
	}
	ids := append([]int64(nil), unsafe.Slice((*int64)(HostPtr(a.TopK)), a.T*a.K)...)
	m.Mu.RLock()
	defer m.Mu.RUnlock()
	if err := m.Lay.CheckArgs(a); err != nil {
		return nil, fmt.Errorf("backend cpu: %w", err)
	}
	snap := m.Snapshot(layer)
	if c.captured(layer, ids, a) {
		return nil, c.mappedCompute(m, layer, a, nil)
	}
	if err := c.mappedCompute(m, layer, a, nil); err != nil {
		return nil, err
	}
	return NewRouting(snap, func() ([]int64, error) { return ids, nil }, nil), nil
}

// mappedCompute computes the layer's FFN over its tables (call with m.Mu
// held for reading); the experts skip[x] marks are read as null entries
// (their pairs skipped), as the kernels read a copy-mode skip list.
func (c *CPU) mappedCompute(m *MapTable, layer int, a FFNArgs, skip []bool) error {
	E := m.Experts
	a = m.Lay.Tables(a, E, func(x int) HostRows {
		if x < len(skip) && skip[x] {
			return HostRows{} // null entries: the expert's pairs are skipped
		}
		return m.Rows(layer*E+x, c.SlotAddr)
	})
	a.SkipInvalid = true // as the GPU kernels: the tracer reports bad ids
	return c.FFN(a)
}

// UnmapAll points every expert back at host memory.
func (c *CPU) UnmapAll() error {
	m := c.mapped.Load()
	if m == nil {
		return nil
	}
	m.Mu.Lock()
	defer m.Mu.Unlock()
	for s := range m.Owner {
		m.Unmap(s)
	}
	return nil
}

// mappedFill is fill under the mapped-mode protocol.
func (c *CPU) mappedFill(m *MapTable, j job) error {
	m.Mu.Lock() // waits for computations reading the slot
	m.Unmap(j.slot)
	m.Mu.Unlock()
	if err := c.fill(j); err != nil {
		return err
	}
	m.Mu.Lock()
	m.Map(j.slot, j.layer*m.Experts+j.expert)
	m.Mu.Unlock()
	return nil
}

// cpuCapture is the CPU backend's stand-in for graph capture: it has no
// graphs, so a "capture" computes as usual and stages the routing, and
// ReplayRouting hands back the staged routing (the engine-side protocol is
// what the tests check).
type cpuCapture struct {
	mu        sync.Mutex
	capturing bool
	captured  []CapturedLayer
	stage     []int64

	// Copy mode: a "replay" (ReplayRouting) publishes every captured
	// layer's routing at once; AwaitLayer takes them in order and
	// ServeLayer fills the slots synchronously.
	copyNext bool
	copyMode bool
	offs     []int64
	counter  []uint64
	pub      [][]cpuPub // per captured layer, oldest first
	changed  chan struct{}

	// The copy-mode hand-off (cpu_copyhand.go).
	handNext [2]int64 // SetCopyHandOff's tokens, hidden for the next capture
	hand     cpuHand
}

type cpuPub struct {
	seq uint64
	ids []int64
	box *cpuBox // the hand-off's mailbox of this publication, or nil
}

// BeginCapture starts recording mapped layers.
func (c *CPU) BeginCapture() error {
	if c.mapped.Load() == nil {
		return fmt.Errorf("backend cpu: mapped mode is off")
	}
	c.capture.mu.Lock()
	defer c.capture.mu.Unlock()
	c.capture.capturing, c.capture.captured, c.capture.stage = true, nil, nil
	c.capture.copyMode = c.capture.copyNext
	c.capture.hand.begin(c.capture.copyMode, c.capture.handNext)
	return nil
}

// EndCapture returns the recorded layers.
func (c *CPU) EndCapture() ([]CapturedLayer, error) {
	c.capture.mu.Lock()
	defer c.capture.mu.Unlock()
	if !c.capture.capturing {
		return nil, fmt.Errorf("backend cpu: no capture in progress")
	}
	c.capture.capturing = false
	n := len(c.capture.captured)
	c.capture.offs, c.capture.counter, c.capture.pub = make([]int64, n), make([]uint64, n), make([][]cpuPub, n)
	var off int64
	for i, l := range c.capture.captured {
		c.capture.offs[i] = off
		off += l.Pairs
	}
	if c.capture.changed == nil {
		c.capture.changed = make(chan struct{})
	}
	c.capture.hand.end(n)
	return c.capture.captured, nil
}

// ReplayRouting returns the staged routing with the current residency.
func (c *CPU) ReplayRouting(stream uintptr, layers []CapturedLayer) (*Routing, error) {
	m := c.mapped.Load()
	if m == nil {
		return nil, fmt.Errorf("backend cpu: mapped mode is off")
	}
	c.capture.mu.Lock()
	if c.capture.copyMode && c.capture.hand.tokens > 0 {
		c.capture.mu.Unlock()
		return c.handReplay(m, layers)
	}
	ids := append([]int64(nil), c.capture.stage...)
	if c.capture.copyMode {
		for i, l := range c.capture.captured {
			c.capture.counter[i]++
			off := c.capture.offs[i]
			c.capture.pub[i] = append(c.capture.pub[i], cpuPub{seq: c.capture.counter[i], ids: ids[off : off+l.Pairs]})
		}
		close(c.capture.changed)
		c.capture.changed = make(chan struct{})
	}
	c.capture.mu.Unlock()
	m.Mu.RLock()
	var snap []bool
	for _, l := range layers {
		snap = append(snap, m.Snapshot(l.Layer)...)
	}
	m.Mu.RUnlock()
	return NewRouting(snap, func() ([]int64, error) { return ids, nil }, nil), nil
}

// captured records a layer computed during a capture (and, with the
// copy-mode hand-off, its arguments, for the replays to compute it
// again); false when none is in progress.
func (c *CPU) captured(layer int, ids []int64, a FFNArgs) bool {
	c.capture.mu.Lock()
	defer c.capture.mu.Unlock()
	if !c.capture.capturing {
		return false
	}
	c.capture.captured = append(c.capture.captured, CapturedLayer{Layer: layer, Pairs: int64(len(ids)), K: a.K})
	c.capture.stage = append(c.capture.stage, ids...)
	if c.capture.hand.tokens > 0 {
		c.capture.hand.args = append(c.capture.hand.args, a)
	}
	return true
}

// SetCopyMode selects copy mode for the captures that follow.
func (c *CPU) SetCopyMode(on bool) error {
	c.capture.mu.Lock()
	defer c.capture.mu.Unlock()
	c.capture.copyNext = on
	return nil
}

// AwaitLayer returns the oldest published routing of captured layer i not
// yet taken, waiting for ReplayRouting to publish one.
func (c *CPU) AwaitLayer(i int, stop <-chan struct{}) ([]int64, uint64, error) {
	c.capture.mu.Lock()
	for {
		if !c.capture.copyMode || i < 0 || i >= len(c.capture.pub) {
			c.capture.mu.Unlock()
			return nil, 0, fmt.Errorf("backend cpu: no copy-mode capture has a layer %d", i)
		}
		if q := c.capture.pub[i]; len(q) > 0 {
			c.capture.pub[i] = q[1:]
			if i < len(c.capture.hand.cur) {
				c.capture.hand.cur[i] = q[0].box
			}
			c.capture.mu.Unlock()
			return q[0].ids, q[0].seq, nil
		}
		ch := c.capture.changed
		c.capture.mu.Unlock()
		select {
		case <-ch:
		case <-stop:
			return nil, 0, ErrClosed
		}
		c.capture.mu.Lock()
	}
}

// ServeLayer fills each load's slot synchronously under the mapped-mode
// protocol (the CPU's layers have already run: there is nothing to let go;
// with the copy-mode hand-off, ServeLayerCPU's protocol).
func (c *CPU) ServeLayer(i int, seq uint64, loads []SlotLoad) error {
	return c.ServeLayerCPU(i, seq, loads, nil, nil)
}

// fillLoads fills each load's slot synchronously under the mapped-mode
// protocol.
func (c *CPU) fillLoads(loads []SlotLoad) error {
	m := c.mapped.Load()
	if m == nil {
		return fmt.Errorf("backend cpu: mapped mode is off")
	}
	for _, l := range loads {
		if l.Slot < 0 || l.Slot >= c.slots || l.Layer < 0 || l.Layer >= m.Layers || l.Expert < 0 || l.Expert >= m.Experts {
			return fmt.Errorf("backend cpu: load of L%d/E%d into slot %d out of range", l.Layer, l.Expert, l.Slot)
		}
		if err := c.mappedFill(m, job{slot: l.Slot, layer: l.Layer, expert: l.Expert}); err != nil {
			return err
		}
	}
	return nil
}
