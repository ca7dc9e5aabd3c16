//go:build cuda

package cuda

import (
	"fmt"
	"sync"
	"unsafe"

	"gorgonia.org/cu"

	"github.com/moe-infinity/moe_infinity/go/backend"
)

// routingRing is the number of routing copies that may be in flight to
// the host (the tracer gives each back once read); routingIDs the most
// ids (tokens × top-k) one copy holds.
const (
	routingRing = 256
	routingIDs  = 4096
)

// mapped is the device side of mapped mode: per-layer tables of expert row
// pointers ([layer][entry][expert] uint64; entries gate, up and down rows,
// then for FP8 experts their scale grids: backend.MappedLayout.Entries)
// that the FFN kernels read, pointing at a slot or at the expert's pinned
// host memory.
type mapped struct {
	tab       *backend.MapTable
	dev       uint64    // the device tables
	installed []uintptr // per slot: recorded after the install of its expert
	setFn     cu.Function

	streamMu sync.Mutex
	compute  uintptr // the stream computations are submitted to
	switchEv uintptr

	ringH  unsafe.Pointer // pinned [routingRing][routingIDs]int64
	ringEv [routingRing]uintptr
	free   chan int

	// Graph capture: loads hold capMu for reading, a capture for writing;
	// captured layers stage their routing at stage (device, routingIDs ids).
	capMu     sync.RWMutex
	capturing bool
	captured  []backend.CapturedLayer
	stage     uint64
	staged    int64

	// Copy mode (copymode.go): chosen for the next capture, in force for
	// the last one; its buffers; the sequence number last answered per
	// captured layer (the engine's copy driver only).
	copyNext   bool
	copyMode   bool
	cp         *copyState
	copyServed []uint32
	handNext   [2]int64 // SetCopyHandOff's tokens and hidden, for the next capture
}

// entry is the device address of table entry j (backend.EntryGate, ...)
// of expert i = layer*E+x.
func (m *mapped) entry(i, j int) uint64 {
	E := m.tab.Experts
	layer, x := i/E, i%E
	return m.layerTable(layer) + uint64(8*(j*E+x))
}

// layerTable is the device address of layer's tables.
func (m *mapped) layerTable(layer int) uint64 {
	return m.dev + uint64(8*layer*m.tab.Lay.Entries()*m.tab.Experts)
}

// set points expert i at rows, in stream order. Runs inside do.
func (m *mapped) set(stream uintptr, i int, rows backend.HostRows) error {
	return launch(m.setFn, 1, 1, 32, stream, m.entry(i, 0), uint64(m.tab.Experts), uint64(m.tab.Lay.Entries()),
		uint64(rows[0]), uint64(rows[1]), uint64(rows[2]), uint64(rows[3]), uint64(rows[4]), uint64(rows[5]))
}

// useStream makes s the stream table updates are ordered on; when it
// changes, s first waits for the work on the old one. Runs inside do.
func (m *mapped) useStream(s uintptr) error {
	m.streamMu.Lock()
	defer m.streamMu.Unlock()
	old := m.compute
	m.compute = s
	if old == s || old == 0 {
		return nil
	}
	if err := eventRecord(m.switchEv, old); err != nil {
		return err
	}
	return streamWait(s, m.switchEv)
}

func (m *mapped) computeStream() uintptr {
	m.streamMu.Lock()
	defer m.streamMu.Unlock()
	return m.compute
}

// EnableMapped turns mapped mode on: every expert's rows (and, for FP8
// experts, scale grids) must be in pinned host memory the GPU can read
// (registered with DEVICEMAP, or staged).
func (b *Backend) EnableMapped(l backend.MappedLayout) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.opened || b.closed {
		return fmt.Errorf("backend cuda: mapped mode needs an open backend")
	}
	if b.m.Load() != nil {
		return nil
	}
	layers := len(b.segs) / b.experts
	var devErr error
	tab, err := backend.NewMapTable(l, b.slots, layers, b.experts, func(layer, x int) (backend.HostRows, bool) {
		var segs []backend.Segment
		for _, s := range b.segs[layer*b.experts+x] {
			segs = append(segs, backend.Segment{Offset: s.off, Data: unsafe.Slice((*byte)(s.ptr), s.n)})
		}
		rows, ok := backend.ResolveHostRows(l, segs)
		if !ok || devErr != nil {
			return rows, false
		}
		for j := range l.Entries() {
			if rows[j], devErr = b.deviceAddr(rows[j]); devErr != nil {
				return rows, false
			}
		}
		return rows, true
	})
	if devErr != nil {
		return fmt.Errorf("backend cuda: host experts are not mapped for the GPU: %w", devErr)
	}
	if err != nil {
		return fmt.Errorf("backend cuda: %w", err)
	}
	m := &mapped{tab: tab, free: make(chan int, routingRing)}
	err = b.dev.do(func() error {
		var err error
		if m.setFn, err = b.mod.Function("moe_table_set"); err != nil {
			return err
		}
		N := l.Entries()
		n := int64(len(tab.Host)*N) * 8
		if m.dev, err = memAlloc(n); err != nil {
			return err
		}
		init := make([]uint64, len(tab.Host)*N)
		for i, r := range tab.Host {
			for j := range N {
				init[int(m.entry(i, j)-m.dev)/8] = uint64(r[j])
			}
		}
		if err := copyHtoD(m.dev, unsafe.Pointer(&init[0]), n, b.prefetch); err != nil {
			return err
		}
		if err := streamSync(b.prefetch); err != nil {
			return err
		}
		for range b.slots {
			ev, err := eventCreate()
			if err != nil {
				return err
			}
			m.installed = append(m.installed, ev)
		}
		if m.switchEv, err = eventCreate(); err != nil {
			return err
		}
		if m.ringH, err = hostAlloc(routingRing * routingIDs * 8); err != nil {
			return err
		}
		for r := range m.ringEv {
			if m.ringEv[r], err = blockingEventCreate(); err != nil {
				return err
			}
			m.free <- r
		}
		return nil
	})
	if err != nil {
		b.freeMapped(m, func(error) {})
		return fmt.Errorf("backend cuda: enabling mapped mode: %w", err)
	}
	b.m.Store(m)
	return nil
}

// deviceAddr is the device address of pinned host address p.
func (b *Backend) deviceAddr(p uintptr) (uintptr, error) {
	var d uint64
	err := b.dev.do(func() error {
		var err error
		d, err = hostDevicePtr(*(*unsafe.Pointer)(unsafe.Pointer(&p)))
		return err
	})
	return uintptr(d), err
}

// MappedFFN launches the layer's FFN over its table and copies the
// routing to a pinned buffer; nothing waits.
func (b *Backend) MappedFFN(layer int, a backend.FFNArgs) (*backend.Routing, error) {
	m := b.m.Load()
	if m == nil {
		return nil, fmt.Errorf("backend cuda: mapped mode is off")
	}
	E := m.tab.Experts
	P := a.T * a.K
	switch {
	case layer < 0 || layer >= m.tab.Layers:
		return nil, fmt.Errorf("backend cuda: layer %d out of range [0, %d)", layer, m.tab.Layers)
	case a.T <= 0 || a.K <= 0 || P > routingIDs:
		return nil, fmt.Errorf("backend cuda: mapped FFN of %d tokens × %d experts (at most %d pairs)", a.T, a.K, routingIDs)
	case a.X == 0 || a.Out == 0 || a.Scratch == 0 || a.TopK == 0 || a.Weights == 0:
		return nil, fmt.Errorf("backend cuda: mapped FFN: a tensor address is null")
	}
	if _, _, err := kernelDTypes(a); err != nil {
		return nil, err
	}
	if err := m.tab.Lay.CheckArgs(a); err != nil {
		return nil, fmt.Errorf("backend cuda: %w", err)
	}
	if q := a.FP8; q != nil {
		if err := q.CheckBlock(a.Inter); err != nil {
			return nil, fmt.Errorf("backend cuda: %w", err)
		}
	}
	if err := checkFP8(a); err != nil {
		return nil, err
	}
	if m.capturing {
		return nil, b.captureFFN(m, layer, a)
	}
	m.tab.Mu.RLock()
	snap := m.tab.Snapshot(layer)
	m.tab.Mu.RUnlock()
	return b.routingCopy(m, snap, a.TopK, P, a.Stream, func() error {
		return b.launchTables(a, m.layerTable(layer), E, 0)
	})
}

// routingCopy submits before() on stream, then copies n routing ids from
// src to a ring buffer and records its event; the Routing waits for that
// event and gives the buffer back.
func (b *Backend) routingCopy(m *mapped, snap []bool, src uint64, n int64, stream uintptr, before func() error) (*backend.Routing, error) {
	r := <-m.free
	buf := unsafe.Add(m.ringH, r*routingIDs*8)
	err := b.dev.do(func() error {
		if err := m.useStream(stream); err != nil {
			return err
		}
		if err := before(); err != nil {
			return err
		}
		if err := copyDtoHAsync(buf, src, n*8, stream); err != nil {
			return err
		}
		return eventRecord(m.ringEv[r], stream)
	})
	if err != nil {
		m.free <- r
		return nil, err
	}
	wait := func() ([]int64, error) {
		err := b.dev.do(func() error { return eventSync(m.ringEv[r]) })
		return unsafe.Slice((*int64)(buf), n), err
	}
	return backend.NewRouting(snap, wait, func() { m.free <- r }), nil
}

// UnmapAll points every mapped expert back at host memory.
func (b *Backend) UnmapAll() error {
	m := b.m.Load()
	if m == nil {
		return nil
	}
	m.capMu.RLock()
	defer m.capMu.RUnlock()
	return b.dev.do(func() error {
		for s := range b.slots {
			if err := b.unmapSlot(m, s, b.prefetch); err != nil {
				return err
			}
		}
		return nil
	})
}

// unmapSlot points slot's expert back at host memory after every
// computation submitted so far and records the slot's free event there
// (fallback: the copy stream, when no mapped layer has run yet). Runs in do.
//
// The free event is recorded again, so the stream first waits for its last
// record: Release put it after the synchronous layers that read the slot,
// which may have run on another stream (or are the only readers, when no
// mapped layer has run and the update goes on the copy stream). Without
// that wait the copy into the slot could overwrite the old expert while
// such a kernel still read it.
func (b *Backend) unmapSlot(m *mapped, slot int, fallback uintptr) error {
	m.tab.Mu.Lock()
	o := m.tab.Unmap(slot)
	m.tab.Mu.Unlock()
	if o < 0 {
		return nil
	}
	cs := m.computeStream()
	if cs == 0 {
		cs = fallback
	}
	if err := streamWait(cs, m.installed[slot]); err != nil {
		return err
	}
	if err := streamWait(cs, b.free[slot]); err != nil {
		return err
	}
	if err := m.set(cs, o, m.tab.Host[o]); err != nil {
		return err
	}
	return b.recordFree(slot, cs)
}

// mapSlot points (layer, expert) at slot after the copy on stream. Runs in do.
func (b *Backend) mapSlot(m *mapped, slot, layer, expert int, stream uintptr) error {
	i := layer*m.tab.Experts + expert
	if err := m.set(stream, i, b.slotRows(m, slot)); err != nil {
		return err
	}
	if err := eventRecord(m.installed[slot], stream); err != nil {
		return err
	}
	m.tab.Mu.Lock()
	m.tab.Map(slot, i)
	m.tab.Mu.Unlock()
	return nil
}

// freeMapped releases mapped mode's resources. Runs with b.mu held.
func (b *Backend) freeMapped(m *mapped, keep func(error)) {
	if m == nil {
		return
	}
	keep(b.dev.do(func() error {
		for _, ev := range m.ringEv {
			if ev != 0 {
				keep(eventSync(ev))
				keep(eventDestroy(ev))
			}
		}
		for _, ev := range append(m.installed, m.switchEv) {
			if ev != 0 {
				keep(eventSync(ev))
				keep(eventDestroy(ev))
			}
		}
		if m.ringH != nil {
			keep(hostFree(m.ringH))
		}
		if m.stage != 0 {
			keep(memFree(m.stage))
		}
		freeCopy(m.cp, keep)
		if m.dev != 0 {
			keep(memFree(m.dev))
		}
		return nil
	}))
}

// captureFFN submits one layer during a capture: the kernels, and a copy
// of the routing to its staging row (device to device, so the replay never
// writes host memory the tracer may be reading).
func (b *Backend) captureFFN(m *mapped, layer int, a backend.FFNArgs) error {
	P := a.T * a.K
	if m.staged+P > routingIDs {
		return fmt.Errorf("backend cuda: a captured step routes more than %d (token, expert) pairs", routingIDs)
	}
	if cs := m.computeStream(); cs != a.Stream {
		// Switching streams would need a wait on an event from outside the
		// capture: run a step on the capture stream first (a warm-up).
		return fmt.Errorf("backend cuda: capture on stream %#x but the last mapped layer ran on %#x; warm up on the capture stream first", a.Stream, cs)
	}
	err := b.dev.do(func() error {
		var skip uint64
		if m.copyMode {
			var err error
			if skip, a.Addend, err = b.captureCopyWait(m, len(m.captured), a); err != nil {
				return err
			}
		}
		if err := b.launchTables(a, m.layerTable(layer), m.tab.Experts, skip); err != nil {
			return err
		}
		return copyDtoDAsync(m.stage+uint64(8*m.staged), a.TopK, P*8, a.Stream)
	})
	if err != nil {
		return err
	}
	m.captured = append(m.captured, backend.CapturedLayer{Layer: layer, Pairs: P, K: a.K})
	m.staged += P
	return nil
}

// BeginCapture stops loads until EndCapture and stages routing on the
// device.
func (b *Backend) BeginCapture() error {
	m := b.m.Load()
	if m == nil {
		return fmt.Errorf("backend cuda: mapped mode is off")
	}
	m.capMu.Lock()
	if m.stage == 0 {
		err := b.dev.do(func() error {
			var err error
			m.stage, err = memAlloc(routingIDs * 8)
			return err
		})
		if err != nil {
			m.capMu.Unlock()
			return err
		}
	}
	m.capturing, m.captured, m.staged = true, nil, 0
	m.copyMode = m.copyNext
	if m.copyMode {
		if err := b.beginCopyCapture(m); err != nil {
			m.capturing = false
			m.capMu.Unlock()
			return fmt.Errorf("backend cuda: preparing a copy-mode capture: %w", err)
		}
	}
	return nil
}

// EndCapture lets loads run again and returns the captured layers.
func (b *Backend) EndCapture() ([]backend.CapturedLayer, error) {
	m := b.m.Load()
	if m == nil || !m.capturing {
		return nil, fmt.Errorf("backend cuda: no capture in progress")
	}
	out := m.captured
	m.capturing, m.captured = false, nil
	m.copyServed = make([]uint32, len(out))
	if m.copyMode {
		if err := b.endCopyCapture(m); err != nil {
			m.copyMode = false // the captured waits are never answered: they time out and read in place
			m.capMu.Unlock()
			return nil, fmt.Errorf("backend cuda: finishing a copy-mode capture: %w", err)
		}
	}
	m.capMu.Unlock()
	return out, nil
}

// ReplayRouting copies the staged routing of one replay to host memory in
// one copy ordered after the replay.
func (b *Backend) ReplayRouting(stream uintptr, layers []backend.CapturedLayer) (*backend.Routing, error) {
	m := b.m.Load()
	if m == nil || m.stage == 0 {
		return nil, fmt.Errorf("backend cuda: nothing was captured")
	}
	var n int64
	for _, l := range layers {
		n += l.Pairs
	}
	if n > routingIDs || len(layers) == 0 {
		return nil, fmt.Errorf("backend cuda: %d captured layers of %d pairs", len(layers), n)
	}
	E := m.tab.Experts
	snap := make([]bool, 0, len(layers)*E)
	m.tab.Mu.RLock()
	for _, l := range layers {
		snap = append(snap, m.tab.Snapshot(l.Layer)...)
	}
	m.tab.Mu.RUnlock()
	return b.routingCopy(m, snap, m.stage, n, stream, func() error { return nil })
}
