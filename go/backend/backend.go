// Package backend defines where the expert cache lives and how experts are
// copied into it. The CPU backend (this package) is the reference
// implementation and the test oracle: its "device" tier is a host arena and
// copies run on worker goroutines. The CUDA backend implements the same
// interface behind the cuda build tag.
package backend

import (
	"errors"
	"slices"
	"sync"

	"github.com/moe-infinity/moe_infinity/go/layout"
)

// ErrClosed is returned by loads issued after Close.
var ErrClosed = errors.New("backend: closed")

// ErrUnsupported marks an Open that fails because the device cannot run
// what was asked of it (a kernel build for a newer GPU), not for lack of
// memory.
var ErrUnsupported = errors.New("backend: unsupported on this device")

// Source produces the slot image of one expert. Fill must be safe to call
// from several goroutines at once.
type Source interface {
	// SlotBytes is the size of one slot image in bytes.
	SlotBytes() int64
	// Fill writes the image of expert (layer, expert) into dst, which is
	// at least SlotBytes long. A source whose bytes are a file mapping
	// reads them under its own Guard.
	Fill(layer, expert int, dst []byte) error
	// Guard runs read, which reads the source's host memory (the bytes of
	// Segments, or mapped mode's host rows) on the calling goroutine, and
	// returns a memory fault there as an error instead of letting it kill
	// the process (a checkpoint file truncated under its mapping faults
	// with SIGBUS; see store.Guard). Faults are per goroutine: a backend
	// that reads source memory on several goroutines guards each one.
	Guard(read func() error) error
}

// Transfer is an asynchronous copy of one expert into one slot.
type Transfer interface {
	// Done is closed when the slot may be used: for the CPU backend when
	// the copy has finished, for an Ordered backend as soon as the copy is
	// ordered before later work (see Ordered.Use).
	Done() <-chan struct{}
	// Finished is closed when the copy has physically completed.
	Finished() <-chan struct{}
	// Err is the copy's error; valid once Done is closed.
	Err() error
}

// Ordered backends order copies and computation on the device, so the host
// need not wait for a copy before handing its slot to a computation.
type Ordered interface {
	// Use makes work submitted to stream after this call wait for the
	// copies into slots.
	Use(slots []int, stream uintptr) error
	// Release records that the work submitted to stream so far is the
	// last reader of slots: a later copy into them waits for it.
	Release(slots []int, stream uintptr) error
}

// Segment is one byte range of an expert's slot image (layout.Segment).
type Segment = layout.Segment

// SegmentSource is a Source that can also describe an expert's slot image
// as host byte ranges, when no conversion is needed, so that a device
// backend copies from them directly (after pinning them) instead of
// keeping a converted copy.
type SegmentSource interface {
	Source
	// Segments returns expert (layer, expert)'s slot image as byte runs,
	// or ok=false when the image needs conversion (then use Fill).
	Segments(layer, expert int) (segs []Segment, ok bool)
	// Shape returns the number of layers and experts per layer.
	Shape() (layers, experts int)
}

// Progress reports a long operation's progress (bytes done of total).
type Progress interface {
	Progress() (done, total int64)
}

// Backend owns the device tier: a fixed number of equally sized slots.
type Backend interface {
	// Name identifies the backend ("cpu", "cuda").
	Name() string
	// Capabilities says which ways of running a MoE layer the backend
	// offers the engine's executor.
	Capabilities() Capabilities
	// Open allocates slots×slotBytes bytes of device memory and keeps src
	// as the origin of every copy. It is called once.
	Open(slots int, slotBytes int64, src Source) error
	// Load starts copying expert (layer, expert) into slot and returns at
	// once. Urgent (on-demand) loads are served before queued
	// non-urgent (prefetch) ones.
	Load(slot, layer, expert int, urgent bool) Transfer
	// SlotAddr is the device address of slot (valid between Open and
	// Close).
	SlotAddr(slot int) uintptr
	// Arena returns the base address and size in bytes of the memory that
	// holds every slot contiguously.
	Arena() (addr uintptr, size int64)
	// Close waits for copies in flight, frees the device memory and
	// makes later loads fail with ErrClosed. Idempotent.
	Close() error
}

// Pending is a Transfer completed by its producer: Ready when the slot may
// be used, Finish when the copy has physically completed.
type Pending struct {
	done, finished        chan struct{}
	readyOnce, finishOnce sync.Once
	err                   error
}

// NewPending returns a Transfer in progress.
func NewPending() *Pending {
	return &Pending{done: make(chan struct{}), finished: make(chan struct{})}
}

// Done is closed by Ready (or Finish).
func (t *Pending) Done() <-chan struct{} { return t.done }

// Finished is closed by Finish.
func (t *Pending) Finished() <-chan struct{} { return t.finished }

// Err waits for Done and returns the error given to Ready or Finish.
func (t *Pending) Err() error {
	<-t.done
	return t.err
}

// Ready marks the slot usable (err == nil) or the copy failed.
func (t *Pending) Ready(err error) {
	t.readyOnce.Do(func() {
		t.err = err
		close(t.done)
	})
}

// Finish marks the copy complete (and Ready, if it was not).
func (t *Pending) Finish(err error) {
	t.Ready(err)
	t.finishOnce.Do(func() { close(t.finished) })
}

// Failed returns a Transfer that has already failed with err.
func Failed(err error) Transfer {
	t := NewPending()
	t.Finish(err)
	return t
}

// Capabilities is what a backend offers the engine's layer executor. The
// executor's choice between execution paths rests on it (and on the layer
// at hand), never on the backend's name or on type assertions.
type Capabilities struct {
	// ExpertKernels: the backend's fused expert FFN (Kernels) is the fast
	// way to compute standard SwiGLU experts on it. The CPU backend's FFN
	// is a reference for tests: on the CPU, transformers' own expert code
	// stays the default, which keeps outputs bitwise identical to it.
	ExpertKernels bool
	// Mapped: the kernels can read experts that are not resident in place,
	// from host memory (Mapped), so a layer never waits for the host.
	Mapped bool
	// MaxMappedPairs is the most (token, expert) pairs one mapped call
	// takes (the backend's routing buffers); 0 when Mapped is false.
	MaxMappedPairs int64
	// QuantFormats lists the quantized expert formats (quant_method names,
	// layout.QuantMethods) the kernels compute straight from their
	// compressed bytes (FFNArgs.FP8 for "fp8"): from the slots and, when
	// Mapped, in place from host memory too (MappedLayout's scale grids).
	QuantFormats []string
	// FFNKinds lists the experts' computations (Setup.FFN names) the
	// kernels implement besides standard SwiGLU, which ExpertKernels
	// implies: "gpt_oss" (FFNArgs.GptOss), from slots and, when Mapped, in
	// place (MappedLayout.GptOss).
	FFNKinds []string
	// KernelBuild names the build of GPU kernels the backend loads at Open
	// ("sm80" or "sm89", the engine option kernel_build); "" for a backend
	// without GPU kernels.
	KernelBuild string
}

// Computes reports whether the kernels implement the experts'
// computation ffn (a Setup.FFN name).
func (c Capabilities) Computes(ffn string) bool {
	return c.ExpertKernels && (ffn == "swiglu" || slices.Contains(c.FFNKinds, ffn))
}

// ReadsQuant reports whether the kernels compute experts quantized with
// method (a quant_method name) from their compressed slots.
func (c Capabilities) ReadsQuant(method string) bool {
	return slices.Contains(c.QuantFormats, method)
}
