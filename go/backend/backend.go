// Package backend defines where the expert cache lives and how experts are
// copied into it. The CPU backend (this package) is the reference
// implementation and the test oracle: its "device" tier is a host arena and
// copies run on worker goroutines. The CUDA backend implements the same
// interface behind the cuda build tag.
package backend

import (
	"errors"
	"sync"
)

// ErrClosed is returned by loads issued after Close.
var ErrClosed = errors.New("backend: closed")

// Source produces the slot image of one expert. Fill must be safe to call
// from several goroutines at once.
type Source interface {
	// SlotBytes is the size of one slot image in bytes.
	SlotBytes() int64
	// Fill writes the image of expert (layer, expert) into dst, which is
	// at least SlotBytes long.
	Fill(layer, expert int, dst []byte) error
}

// Transfer is an asynchronous copy of one expert into one slot.
type Transfer interface {
	// Done is closed when the copy has finished, successfully or not.
	Done() <-chan struct{}
	// Err is the copy's error; valid once Done is closed.
	Err() error
}

// Backend owns the device tier: a fixed number of equally sized slots.
type Backend interface {
	// Name identifies the backend ("cpu", "cuda").
	Name() string
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

// transfer is a Transfer completed by a call to finish.
type transfer struct {
	done chan struct{}
	once sync.Once
	err  error
}

func newTransfer() *transfer { return &transfer{done: make(chan struct{})} }

func (t *transfer) Done() <-chan struct{} { return t.done }
func (t *transfer) Err() error {
	<-t.done
	return t.err
}

func (t *transfer) finish(err error) {
	t.once.Do(func() {
		t.err = err
		close(t.done)
	})
}

// Failed returns a Transfer that has already failed with err.
func Failed(err error) Transfer {
	t := newTransfer()
	t.finish(err)
	return t
}
