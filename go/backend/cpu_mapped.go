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
	ids := append([]int64(nil), unsafe.Slice((*int64)(ptrOf(a.TopK)), a.T*a.K)...)
	m.Mu.RLock()
	defer m.Mu.RUnlock()
	E := m.Experts
	a.GateUp, a.Up, a.Down = make([]uint64, E), make([]uint64, E), make([]uint64, E)
	for x := range E {
		r := m.Rows(layer*E+x, c.SlotAddr)
		a.GateUp[x], a.Up[x], a.Down[x] = uint64(r[0]), uint64(r[1]), uint64(r[2])
	}
	snap := m.Snapshot(layer)
	a.SkipInvalid = true // as the GPU kernels: the tracer reports bad ids
	if err := c.FFN(a); err != nil {
		return nil, err
	}
	if c.captured(layer, ids, a.K) {
		return nil, nil
	}
	return NewRouting(snap, func() ([]int64, error) { return ids, nil }, nil), nil
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
}

// BeginCapture starts recording mapped layers.
func (c *CPU) BeginCapture() error {
	if c.mapped.Load() == nil {
		return fmt.Errorf("backend cpu: mapped mode is off")
	}
	c.capture.mu.Lock()
	defer c.capture.mu.Unlock()
	c.capture.capturing, c.capture.captured, c.capture.stage = true, nil, nil
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
	return c.capture.captured, nil
}

// ReplayRouting returns the staged routing with the current residency.
func (c *CPU) ReplayRouting(stream uintptr, layers []CapturedLayer) (*Routing, error) {
	m := c.mapped.Load()
	if m == nil {
		return nil, fmt.Errorf("backend cpu: mapped mode is off")
	}
	c.capture.mu.Lock()
	ids := append([]int64(nil), c.capture.stage...)
	c.capture.mu.Unlock()
	m.Mu.RLock()
	var snap []bool
	for _, l := range layers {
		snap = append(snap, m.Snapshot(l.Layer)...)
	}
	m.Mu.RUnlock()
	return NewRouting(snap, func() ([]int64, error) { return ids, nil }, nil), nil
}

// captured records a layer computed during a capture; false when none is
// in progress.
func (c *CPU) captured(layer int, ids []int64, K int64) bool {
	c.capture.mu.Lock()
	defer c.capture.mu.Unlock()
	if !c.capture.capturing {
		return false
	}
	c.capture.captured = append(c.capture.captured, CapturedLayer{Layer: layer, Pairs: int64(len(ids)), K: K})
	c.capture.stage = append(c.capture.stage, ids...)
	return true
}
