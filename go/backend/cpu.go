package backend

import (
	"fmt"
	"time"

	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"
)

type job struct {
	slot, layer, expert int
	t                   *Pending
	queued              time.Time // when Load queued it (the link model's clock)
}

// CPU is the reference backend: slots live in one anonymous memory mapping
// (never Go heap, so Python may wrap it) and copies run on worker
// goroutines that serve urgent loads before prefetches.
type CPU struct {
	// ReferenceKernels: Capabilities offers the reference FFN and mapped
	// mode to the engine's executor (set before Open).
	ReferenceKernels bool
	// ExpertThreads, when > 0, makes FFN run the SIMD expert kernels
	// (package cpuffn) on that many threads, and Capabilities offer them to
	// the engine's executor (set before Open). 0: FFN is ReferenceFFN.
	ExpertThreads int
	// CopyTimeout is how long a layer of a copy-mode replay with the
	// hand-off on waits for its answer (the CUDA backend's copyTimeout;
	// 0: 2 s). Set before the replays.
	CopyTimeout time.Duration
	// Link, when its GBps is > 0, makes copies take as long as over a
	// device link (set before Open): see LinkModel.
	Link LinkModel

	workers  int
	link     sync.Mutex // held by the worker whose copy is on the modelled link
	linkFree time.Time  // when the modelled link is done with the copies so far (guarded by link)

	mu        sync.Mutex
	wake      chan struct{}
	urgent    []job
	normal    []job
	closed    bool
	opened    bool
	arena     []byte
	slots     int
	slotBytes int64
	src       Source
	wg        sync.WaitGroup
	mapped    atomic.Pointer[MapTable] // set by EnableMapped
	capture   cpuCapture
	simd      ffnKernel // ExpertThreads' kernel, made at the first FFN (nil without cgo)
	views     cpuViews  // AllocViews' memory (views.go)
	partial   []float32 // the hand-off's partial output (handoff.go)
	partialN  int64     // its floats in the last HandOut
}

// NewCPU returns a CPU backend with the given number of copy workers
// (<= 0 picks min(4, GOMAXPROCS)).
func NewCPU(workers int) *CPU {
	if workers <= 0 {
		workers = min(4, runtime.GOMAXPROCS(0))
	}
	return &CPU{workers: workers, wake: make(chan struct{})}
}

// Name returns "cpu".
func (c *CPU) Name() string { return "cpu" }

// Open maps the arena and starts the workers.
func (c *CPU) Open(slots int, slotBytes int64, src Source) error {
	if slots < 1 || slotBytes < 1 {
		return fmt.Errorf("backend cpu: need at least one slot of at least one byte (got %d × %d)", slots, slotBytes)
	}
	if src == nil {
		return fmt.Errorf("backend cpu: nil source")
	}
	size := int64(slots) * slotBytes
	if size/int64(slots) != slotBytes || size > 1<<46 {
		return fmt.Errorf("backend cpu: arena of %d × %d bytes is too large", slots, slotBytes)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return ErrClosed
	}
	if c.opened {
		return fmt.Errorf("backend cpu: already opened")
	}
	arena, err := syscall.Mmap(-1, 0, int(size), syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANON)
	if err != nil {
		return fmt.Errorf("backend cpu: cannot map a %d-byte arena: %w", size, err)
	}
	c.arena, c.slots, c.slotBytes, c.src, c.opened = arena, slots, slotBytes, src, true
	for i := 0; i < c.workers; i++ {
		c.wg.Add(1)
		go c.work()
	}
	return nil
}

func (c *CPU) next() (job, bool) {
	c.mu.Lock()
	for {
		if len(c.urgent) > 0 {
			j := c.urgent[0]
			c.urgent = c.urgent[1:]
			c.mu.Unlock()
			return j, true
		}
		if len(c.normal) > 0 {
			j := c.normal[0]
			c.normal = c.normal[1:]
			c.mu.Unlock()
			return j, true
		}
		if c.closed {
			c.mu.Unlock()
			return job{}, false
		}
		ch := c.wake
		c.mu.Unlock()
		<-ch
		c.mu.Lock()
	}
}

// LinkModel is a host→device link for the CPU backend to stand in for:
// with it, one copy at a time crosses (a copy engine), each taking
// Reaction plus its slot's bytes at GBps, and the next copy is chosen
// (urgent before prefetch) only when the link is free. The copy itself is
// a memcpy that finishes sooner; the worker holds the link, and the
// copy's Transfer stays unfinished, until its modelled time is up.
//
// The model keeps its own clock: a copy starts when the link freed or when
// it was queued, whichever is later, not when a worker woke up to take it.
// A sleep may overshoot (by about a millisecond where the host's timers are
// coarse, much longer than a small expert's copy); the copies after it then
// find their modelled end already past and finish at once, so the link's
// rate holds over any run of copies and a single copy finishes at most an
// overshoot late.
//
// Nothing else is slowed: the CPU's own expert computations and in-place
// reads run at the machine's speed. For measuring, on a machine without a
// GPU, what the engine's link-bound choices (prefetch, eviction, the CPU's
// share of misses) do to time, not only to counts.
type LinkModel struct {
	// GBps is the link's rate in GB/s (10^9 bytes a second); 0: no model.
	GBps float64
	// Reaction is the fixed cost of each copy.
	Reaction time.Duration
}

// Duration is how long the link takes to carry bytes.
func (l LinkModel) Duration(bytes int64) time.Duration {
	return l.Reaction + time.Duration(float64(bytes)/l.GBps)
}

func (c *CPU) work() {
	defer c.wg.Done()
	paced := c.Link.GBps > 0
	for {
		if paced {
			c.link.Lock()
		}
		j, ok := c.next()
		if !ok {
			if paced {
				c.link.Unlock()
			}
			return
		}
		var err error
		if m := c.mapped.Load(); m != nil {
			err = c.mappedFill(m, j)
		} else {
			err = c.fill(j)
		}
		if paced {
			begin := j.queued
			if c.linkFree.After(begin) {
				begin = c.linkFree
			}
			c.linkFree = begin.Add(c.Link.Duration(c.slotBytes))
			time.Sleep(time.Until(c.linkFree))
			c.link.Unlock()
		}
		j.t.Finish(err)
	}
}

func (c *CPU) fill(j job) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("backend cpu: panic while filling slot %d with L%d/E%d: %v", j.slot, j.layer, j.expert, r)
		}
	}()
	start := int64(j.slot) * c.slotBytes
	return c.src.Fill(j.layer, j.expert, c.arena[start:start+c.slotBytes])
}

// Load queues a copy of (layer, expert) into slot.
func (c *CPU) Load(slot, layer, expert int, urgent bool) Transfer {
	t := NewPending()
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case c.closed:
		t.Finish(ErrClosed)
	case !c.opened:
		t.Finish(fmt.Errorf("backend cpu: load before Open"))
	case slot < 0 || slot >= c.slots:
		t.Finish(fmt.Errorf("backend cpu: slot %d out of range [0, %d)", slot, c.slots))
	default:
		j := job{slot: slot, layer: layer, expert: expert, t: t, queued: time.Now()}
		if urgent {
			c.urgent = append(c.urgent, j)
		} else {
			c.normal = append(c.normal, j)
		}
		close(c.wake)
		c.wake = make(chan struct{})
	}
	return t
}

// Capabilities: the CPU backend's expert FFN and mapped mode exist as
// references for the CUDA ones (tests, the C ABI), not as the executor's
// paths: on the CPU, transformers' own expert code computes the experts,
// unless ReferenceKernels asks for them (then with the CUDA backend's pair
// limit, so that the executor makes the choices it makes on a GPU).
//
// ExpertThreads offers the SIMD expert kernels (ExpertKernels) without
// mapped mode: they read experts in slots only, and bfloat16/float16
// SwiGLU ones only. ReferenceKernels' FFN also reads FP8 block-scaled and
// MXFP4 slots and computes gpt-oss experts, as the CUDA kernels do
// (QuantFormats, FFNKinds).
func (c *CPU) Capabilities() Capabilities {
	if c.ReferenceKernels {
		return Capabilities{ExpertKernels: true, Mapped: true, MaxMappedPairs: CPUMappedPairs,
			QuantFormats: []string{"fp8", "mxfp4"}, FFNKinds: []string{"gpt_oss"}}
	}
	if c.ExpertThreads > 0 {
		return Capabilities{ExpertKernels: true}
	}
	return Capabilities{}
}

// CPUMappedPairs is the pair limit the CPU backend reports with
// ReferenceKernels: the CUDA backend's (its routing buffers hold 4096
// ids), so that a CPU test sees the executor's GPU choices.
const CPUMappedPairs = 4096

// SlotAddr returns the address of slot in the arena.
func (c *CPU) SlotAddr(slot int) uintptr {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.arena == nil || slot < 0 || slot >= c.slots {
		return 0
	}
	return uintptr(unsafe.Pointer(&c.arena[0])) + uintptr(int64(slot)*c.slotBytes)
}

// Arena returns the arena's base address and size in bytes.
func (c *CPU) Arena() (uintptr, int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.arena == nil {
		return 0, 0
	}
	return uintptr(unsafe.Pointer(&c.arena[0])), int64(len(c.arena))
}

// SlotBytes returns a view of slot's bytes (for tests and the engine's
// own checks); nil when out of range or closed.
func (c *CPU) SlotBytes(slot int) []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.arena == nil || slot < 0 || slot >= c.slots {
		return nil
	}
	start := int64(slot) * c.slotBytes
	return c.arena[start : start+c.slotBytes : start+c.slotBytes]
}

// Close fails queued loads, waits for running ones and unmaps the arena.
func (c *CPU) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	pending := append(c.urgent, c.normal...)
	c.urgent, c.normal = nil, nil
	close(c.wake)
	c.wake = make(chan struct{})
	c.mu.Unlock()
	for _, j := range pending {
		j.t.Finish(ErrClosed)
	}
	c.wg.Wait()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.simd != nil {
		c.simd.Close()
	}
	viewsErr := c.freeViews()
	if c.arena != nil {
		err := syscall.Munmap(c.arena)
		c.arena = nil
		if err != nil {
			return fmt.Errorf("backend cpu: unmap arena: %w", err)
		}
	}
	return viewsErr
}

// ffnKernel is a faster expert FFN for the CPU backend: the SIMD kernels of
// package cpuffn in cgo builds (cpu_simd.go); none without cgo, where
// ReferenceFFN computes every call.
type ffnKernel interface {
	// ffn computes a when it can (done), or leaves it to ReferenceFFN.
	ffn(c *CPU, a FFNArgs) (done bool, err error)
	// Close frees the kernel's memory.
	Close()
}
