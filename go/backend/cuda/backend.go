//go:build cuda

package cuda

import (
	"errors"
	"fmt"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"unsafe"

	"gorgonia.org/cu"

	"github.com/moe-infinity/moe_infinity/go/backend"
)

// chunkBytes is the size of the pinned buffers that hold experts needing
// conversion (several experts per buffer, at least one).
const chunkBytes = 1 << 30

// tableRing is the number of device pointer tables the FFN kernels cycle
// through, so that concurrent launches on different streams never share one.
const tableRing = 8

// tableBytes is the size of one expert's entries in a table: gate, up and
// down rows and, for FP8 experts, their scale grids (gpt-oss experts use
// as many: ossEntries).
const tableBytes = 8 * backend.MaxEntries

// Config selects the device and the kernels' build.
type Config struct {
	// Device is the CUDA ordinal.
	Device int
	// KernelBuild names the PTX build Open loads (KernelBuilds): "sm80"
	// (also ""; the default) or "sm89" (devices of compute capability 8.9
	// and higher; Open fails with backend.ErrUnsupported on others).
	KernelBuild string
}

// Backend is the CUDA backend. All methods are safe for concurrent use.
type Backend struct {
	cfg Config
	dev *device

	mu       sync.Mutex
	opened   bool
	closed   bool
	arena    uint64
	slots    int
	slotSize int64
	demand   uintptr // high-priority stream for on-demand copies
	prefetch uintptr // low-priority stream for prefetches
	ready    []uintptr
	free     []uintptr     // per slot: recorded after the slot's last reader
	freeDone []atomic.Bool // per slot: free is known complete (set by waitFree, cleared by recordFree)
	experts  int
	segs     [][]hostSeg // [layer*experts+expert]
	pinned   []unsafe.Pointer
	regs     []unsafe.Pointer
	events   chan uintptr
	watchers sync.WaitGroup
	done     atomic.Int64
	total    atomic.Int64

	mod cu.Module
	// ffnFns are the FFN kernels (every kernel of kernelParamStructs) by
	// name: SwiGLU, FP8 (FFNArgs.FP8) and gpt-oss (FFNArgs.GptOss) experts.
	ffnFns  map[string]cu.Function
	tables  [tableRing]uint64
	tableEv [tableRing]uintptr
	tableH  unsafe.Pointer // pinned host staging of the tables (tableRing × MaxEntries × tableN pointers)
	tableN  int
	tableI  atomic.Uint64

	m atomic.Pointer[mapped] // mapped mode, once enabled

	views *views // quantized experts' dequantized views (views.go), once allocated

	serveNs [servePhases]atomic.Int64 // copy mode's ServeLayer (PhaseNs)

	hand handOff // hybrid execution's hand-off (handoff.go)
}

type hostSeg struct {
	off int64
	ptr unsafe.Pointer
	n   int64
}

// New returns an unopened CUDA backend.
func New(cfg Config) *Backend { return &Backend{cfg: cfg, events: make(chan uintptr, 64)} }

// Name returns "cuda".
func (b *Backend) Name() string { return "cuda" }

// Capabilities: the fused expert FFN kernels (bfloat16/float16 experts,
// and FP8 block-scaled ones read from their compressed slots; gpt-oss
// experts, bfloat16/float16 or MXFP4, from slots) of the configured build,
// and mapped mode (every kind of experts) for up to routingIDs (token,
// expert) pairs a call.
func (b *Backend) Capabilities() backend.Capabilities {
	return backend.Capabilities{ExpertKernels: true, Mapped: true, MaxMappedPairs: routingIDs, QuantFormats: []string{"fp8", "mxfp4"},
		FFNKinds:    []string{"gpt_oss"},
		KernelBuild: normBuild(b.cfg.KernelBuild)}
}

// DeviceMemory returns the total and free memory of device ordinal, in
// bytes: NVML's numbers when NVML is available, the driver's otherwise.
func DeviceMemory(ordinal int) (total, free int64, err error) {
	d, err := openDevice(ordinal)
	if err != nil {
		return 0, 0, err
	}
	defer d.release()
	if t, f, ok := nvmlMemory(d.pciBusID()); ok {
		return t, f, nil
	}
	f, t, err := d.memInfo()
	return t, f, err
}

// Progress reports how many bytes of the host tier are pinned so far.
func (b *Backend) Progress() (done, total int64) { return b.done.Load(), b.total.Load() }

// Open allocates the slot arena on the GPU, pins every expert in host
// memory and loads the kernels.
func (b *Backend) Open(slots int, slotBytes int64, src backend.Source) (err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return backend.ErrClosed
	}
	if b.opened {
		return fmt.Errorf("backend cuda: already opened")
	}
	ss, ok := src.(backend.SegmentSource)
	if !ok {
		return fmt.Errorf("backend cuda: the source cannot describe expert layers")
	}
	if b.dev, err = openDevice(b.cfg.Device); err != nil {
		return err
	}
	defer func() {
		if err != nil {
			b.freeLocked()
		}
	}()
	ptx, err := b.dev.kernelPTX(b.cfg.KernelBuild)
	if err != nil {
		return err
	}
	b.slots, b.slotSize = slots, slotBytes
	size := int64(slots) * slotBytes
	err = b.dev.do(func() error {
		free, _, err := memInfo()
		if err != nil {
			return err
		}
		if size > free {
			return fmt.Errorf("backend cuda: the cache needs %d bytes of GPU memory but only %d are free on device %d", size, free, b.cfg.Device)
		}
		if b.arena, err = memAlloc(size); err != nil {
			return err
		}
		least, greatest, err := priorityRange()
		if err != nil {
			return err
		}
		if b.demand, err = streamCreate(greatest); err != nil {
			return err
		}
		if b.prefetch, err = streamCreate(least); err != nil {
			return err
		}
		for i := 0; i < slots; i++ {
			r, err := eventCreate()
			if err != nil {
				return err
			}
			f, err := eventCreate()
			if err != nil {
				eventDestroy(r)
				return err
			}
			b.ready = append(b.ready, r)
			b.free = append(b.free, f)
		}
		b.freeDone = make([]atomic.Bool, slots)
		if b.mod, err = moduleLoad(ptx); err != nil {
			// The driver rejects PTX it cannot compile for this GPU (an
			// ISA newer than it knows, an instruction the GPU lacks):
			// not a memory shortage.
			return fmt.Errorf("%w: backend cuda: loading the kernels (kernel_build %q): %v", backend.ErrUnsupported, normBuild(b.cfg.KernelBuild), err)
		}
		b.ffnFns = map[string]cu.Function{}
		for _, ps := range kernelParamStructs {
			for _, k := range ps.kernels {
				if b.ffnFns[k], err = b.mod.Function(k); err != nil {
					return err
				}
			}
		}
		_, perLayer := ss.Shape()
		b.tableN = max(slots, perLayer) // tables are indexed by expert id
		if b.tableH, err = hostAlloc(int64(tableRing * tableBytes * b.tableN)); err != nil {
			return err
		}
		for i := range b.tables {
			if b.tables[i], err = memAlloc(int64(tableBytes * b.tableN)); err != nil {
				return err
			}
			if b.tableEv[i], err = blockingEventCreate(); err != nil {
				return err
			}
		}
		return b.pinHostTier(ss, slotBytes)
	})
	if err != nil {
		return err
	}
	b.opened = true
	return nil
}

// pinHostTier makes every expert copyable from pinned host memory: source
// bytes already in slot format are registered in place (cuMemHostRegister);
// the rest are converted into cuMemHostAlloc'ed buffers. Runs inside do.
//
// A checkpoint file changed on disk under the model cannot crash this
// backend: the staging copies go through src.Fill, which reads the mapping
// under the source's guard, and every other read of a checkpoint page is
// the GPU's (DMA copies, mapped-mode kernels) from pages that registration
// pinned, which stay in memory even when the file is truncated (they keep
// their old bytes, or take a same-size in-place rewrite's new ones). What
// the GPU would then read silently is caught by the engine instead, which
// checks the shards' identity before each layer (and each graph replay).
func (b *Backend) pinHostTier(src backend.SegmentSource, slotBytes int64) error {
	layers, experts := src.Shape()
	b.experts = experts
	b.segs = make([][]hostSeg, layers*experts)
	b.total.Store(int64(layers*experts) * slotBytes)
	// base is a real pointer inside the range, so that the aligned start
	// is derived from it with unsafe.Add rather than made from an integer.
	type rng struct {
		lo, hi uintptr
		base   unsafe.Pointer
	}
	var ranges []rng
	var stage []int
	for i := range b.segs {
		segs, ok := src.Segments(i/experts, i%experts)
		if !ok {
			stage = append(stage, i)
			continue
		}
		for _, s := range segs {
			if len(s.Data) == 0 {
				continue
			}
			p := unsafe.Pointer(&s.Data[0])
			b.segs[i] = append(b.segs[i], hostSeg{off: s.Offset, ptr: p, n: int64(len(s.Data))})
			ranges = append(ranges, rng{uintptr(p), uintptr(p) + uintptr(len(s.Data)), p})
		}
	}
	// Register page-aligned, merged ranges: overlapping registrations fail.
	page := uintptr(os.Getpagesize())
	for i := range ranges {
		ranges[i].lo &^= page - 1
		ranges[i].hi = (ranges[i].hi + page - 1) &^ (page - 1)
	}
	sort.Slice(ranges, func(i, j int) bool { return ranges[i].lo < ranges[j].lo })
	var merged []rng
	for _, r := range ranges {
		if n := len(merged); n > 0 && r.lo <= merged[n-1].hi {
			merged[n-1].hi = max(merged[n-1].hi, r.hi)
			continue
		}
		merged = append(merged, r)
	}
	var failed []rng
	for _, r := range merged {
		p := unsafe.Add(r.base, -int(uintptr(r.base)-r.lo))
		n := int64(r.hi - r.lo)
		err := hostRegister(p, n, false)
		if err != nil {
			err = hostRegister(p, n, true) // read-only mappings (checkpoint files)
		}
		if err != nil {
			failed = append(failed, r)
			continue
		}
		b.regs = append(b.regs, p)
		b.done.Add(n)
	}
	if len(failed) > 0 {
		// Experts touching memory the driver would not pin are staged.
		for i, segs := range b.segs {
			for _, s := range segs {
				hit := false
				for _, r := range failed {
					if uintptr(s.ptr) < r.hi && uintptr(s.ptr)+uintptr(s.n) > r.lo {
						hit = true
						break
					}
				}
				if hit {
					stage = append(stage, i)
					b.segs[i] = nil
					break
				}
			}
		}
	}
	if len(stage) == 0 {
		b.done.Store(b.total.Load())
		return nil
	}
	per := max(1, chunkBytes/slotBytes)
	var chunk unsafe.Pointer
	used := per
	for _, i := range stage {
		if used == per {
			n := min(int64(per), int64(len(stage)))
			p, err := hostAlloc(n * slotBytes)
			if err != nil {
				return fmt.Errorf("backend cuda: pinning %d bytes of host memory for experts that need conversion: %w", n*slotBytes, err)
			}
			b.pinned = append(b.pinned, p)
			chunk, used = p, 0
		}
		dst := unsafe.Add(chunk, int64(used)*slotBytes)
		if err := src.Fill(i/experts, i%experts, unsafe.Slice((*byte)(dst), slotBytes)); err != nil {
			return err
		}
		b.segs[i] = []hostSeg{{off: 0, ptr: dst, n: slotBytes}}
		used++
		b.done.Add(slotBytes)
	}
	b.done.Store(b.total.Load())
	return nil
}

func (b *Backend) event() (uintptr, error) {
	select {
	case e := <-b.events:
		return e, nil
	default:
		return blockingEventCreate()
	}
}

func (b *Backend) putEvent(e uintptr) {
	select {
	case b.events <- e:
	default:
		eventDestroy(e)
	}
}

// Load issues the copy of (layer, expert) into slot on the demand (urgent)
// or prefetch stream, after the last reader of the slot. The transfer is
// Ready at once (later work is ordered after the copy through Use) and
// Finished when the copy completes.
func (b *Backend) Load(slot, layer, expert int, urgent bool) backend.Transfer {
	t := backend.NewPending()
	b.mu.Lock()
	if b.closed || !b.opened {
		b.mu.Unlock()
		if !b.opened {
			t.Finish(fmt.Errorf("backend cuda: load before Open"))
		} else {
			t.Finish(backend.ErrClosed)
		}
		return t
	}
	if slot < 0 || slot >= b.slots {
		b.mu.Unlock()
		t.Finish(fmt.Errorf("backend cuda: slot %d out of range [0, %d)", slot, b.slots))
		return t
	}
	i := layer*b.experts + expert
	if layer < 0 || expert < 0 || expert >= b.experts || i >= len(b.segs) {
		b.mu.Unlock()
		t.Finish(fmt.Errorf("backend cuda: expert L%d/E%d out of range", layer, expert))
		return t
	}
	b.watchers.Add(1)
	b.mu.Unlock()
	stream := b.prefetch
	if urgent {
		stream = b.demand
	}
	var ev uintptr
	m := b.m.Load()
	if m != nil {
		m.capMu.RLock() // no table update may join a graph being captured
		defer m.capMu.RUnlock()
	}
	err := b.dev.do(func() error {
		if m != nil {
			// Kernels submitted from now on read the old expert from host
			// memory; the copy waits for those submitted before.
			if err := b.unmapSlot(m, slot, stream); err != nil {
				return err
			}
		}
		if err := streamWait(stream, b.free[slot]); err != nil {
			return err
		}
		dst := b.arena + uint64(int64(slot)*b.slotSize)
		for _, s := range b.segs[i] {
			if err := copyHtoD(dst+uint64(s.off), s.ptr, s.n, stream); err != nil {
				return err
			}
		}
		if err := eventRecord(b.ready[slot], stream); err != nil {
			return err
		}
		if m != nil {
			if err := b.mapSlot(m, slot, layer, expert, stream); err != nil {
				return err
			}
		}
		var err error
		if ev, err = b.event(); err != nil {
			return err
		}
		return eventRecord(ev, stream)
	})
	if err != nil {
		b.watchers.Done()
		t.Finish(fmt.Errorf("copying L%d/E%d into slot %d: %w", layer, expert, slot, err))
		return t
	}
	t.Ready(nil)
	go func() {
		defer b.watchers.Done()
		err := b.dev.do(func() error { return eventSync(ev) })
		b.putEvent(ev)
		t.Finish(err)
	}()
	return t
}

// Use makes stream wait for the copies into slots.
func (b *Backend) Use(slots []int, stream uintptr) error {
	return b.dev.do(func() error {
		for _, s := range slots {
			if err := streamWait(stream, b.ready[s]); err != nil {
				return err
			}
		}
		return nil
	})
}

// Release records that the work on stream so far is the last reader of slots.
func (b *Backend) Release(slots []int, stream uintptr) error {
	return b.dev.do(func() error {
		for _, s := range slots {
			if err := b.recordFree(s, stream); err != nil {
				return err
			}
		}
		return nil
	})
}

// recordFree records on stream that the work so far is the last reader of
// slot. Runs in do.
func (b *Backend) recordFree(slot int, stream uintptr) error {
	b.freeDone[slot].Store(false)
	return eventRecord(b.free[slot], stream)
}

// waitFree makes stream wait for the last readers of slot, unless they are
// known to have finished: a copy into a slot whose readers ran long ago
// (copy mode's loads, in steady state) costs no stream wait, and the query
// behind that knowledge runs once per record. The caller owns the slot (a
// cache grant), so no reader records on it meanwhile. Runs in do.
func (b *Backend) waitFree(slot int, stream uintptr) error {
	if b.freeDone[slot].Load() {
		return nil
	}
	if eventDone(b.free[slot]) {
		b.freeDone[slot].Store(true)
		return nil
	}
	return streamWait(stream, b.free[slot])
}

// SlotAddr returns the device address of slot.
func (b *Backend) SlotAddr(slot int) uintptr {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.arena == 0 || slot < 0 || slot >= b.slots {
		return 0
	}
	return uintptr(b.arena + uint64(int64(slot)*b.slotSize))
}

// Arena returns the device address and size of the slot arena.
func (b *Backend) Arena() (uintptr, int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.arena == 0 {
		return 0, 0
	}
	return uintptr(b.arena), int64(b.slots) * b.slotSize
}

// Close waits for copies in flight and frees every device and pinned
// resource. Idempotent.
func (b *Backend) Close() error {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil
	}
	b.closed = true
	b.mu.Unlock()
	b.watchers.Wait()
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.freeLocked()
}

func (b *Backend) freeLocked() error {
	if b.dev == nil {
		return nil
	}
	var errs []error
	keep := func(err error) {
		if err != nil {
			errs = append(errs, err)
		}
	}
	b.freeMapped(b.m.Swap(nil), keep)
	b.freeViewsLocked(b.views, keep)
	b.views = nil
	keep(b.dev.do(func() error {
		if b.demand != 0 {
			keep(streamSync(b.demand))
			keep(streamDestroy(b.demand))
		}
		if b.prefetch != 0 {
			keep(streamSync(b.prefetch))
			keep(streamDestroy(b.prefetch))
		}
		b.demand, b.prefetch = 0, 0
		b.freeHandOff(keep)
		for i := range b.tables {
			if b.tableEv[i] != 0 {
				keep(eventSync(b.tableEv[i]))
				keep(eventDestroy(b.tableEv[i]))
				b.tableEv[i] = 0
			}
			if b.tables[i] != 0 {
				keep(memFree(b.tables[i]))
				b.tables[i] = 0
			}
		}
		for _, e := range append(b.ready, b.free...) {
			keep(eventSync(e))
			keep(eventDestroy(e))
		}
		b.ready, b.free = nil, nil
		for {
			select {
			case e := <-b.events:
				keep(eventDestroy(e))
				continue
			default:
			}
			break
		}
		if b.arena != 0 {
			keep(memFree(b.arena))
			b.arena = 0
		}
		for _, p := range b.regs {
			keep(hostUnregister(p))
		}
		b.regs = nil
		for _, p := range b.pinned {
			keep(hostFree(p))
		}
		b.pinned = nil
		if b.tableH != nil {
			keep(hostFree(b.tableH))
			b.tableH = nil
		}
		if b.mod != (cu.Module{}) {
			keep(moduleUnload(b.mod))
			b.mod = cu.Module{}
		}
		return nil
	}))
	keep(b.dev.release())
	b.dev = nil
	return errors.Join(errs...)
}
