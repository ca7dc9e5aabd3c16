package backend

import (
	"fmt"
	"syscall"
	"unsafe"

	"github.com/moe-infinity/moe_infinity/go/layout"
)

// ViewMemory holds the dequantized views of quantized experts beside the
// backend's slots (in device memory on a GPU), so that the caller's expert
// code reads bfloat16/float16 experts where it computes while the cache
// keeps them compressed (layout.Views).
type ViewMemory interface {
	// AllocViews makes n views of bytes each, zeroed, and returns the
	// address of the first (view i starts i×bytes after it). Called once,
	// after Open; Close frees them.
	AllocViews(n int, bytes int64) (uintptr, error)
	// ExpandView writes view's image from slot's by ops (layout.Views.Ops),
	// in stream order: after the copies the stream already waits for, and
	// after the work recorded by the view's last ReleaseView.
	ExpandView(view, slot int, ops []layout.ExpandOp, stream uintptr) error
	// ReleaseView records the work submitted to stream so far as the
	// view's last reader: the next ExpandView of it waits for that work.
	ReleaseView(view int, stream uintptr) error
}

// cpuViews is the CPU backend's view memory: an anonymous mapping, filled
// by the ops run in Go.
type cpuViews struct {
	mem   []byte
	bytes int64
}

// AllocViews maps n zeroed views of bytes each.
func (c *CPU) AllocViews(n int, bytes int64) (uintptr, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.opened || c.closed {
		return 0, fmt.Errorf("backend cpu: views need an open backend")
	}
	if c.views.mem != nil {
		return 0, fmt.Errorf("backend cpu: views are already allocated")
	}
	size := int64(n) * bytes
	if n < 1 || bytes < 1 || size/int64(n) != bytes || size > 1<<46 {
		return 0, fmt.Errorf("backend cpu: %d views of %d bytes cannot be mapped", n, bytes)
	}
	mem, err := syscall.Mmap(-1, 0, int(size), syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANON)
	if err != nil {
		return 0, fmt.Errorf("backend cpu: cannot map %d views of %d bytes: %w", n, bytes, err)
	}
	c.views = cpuViews{mem: mem, bytes: bytes}
	return uintptr(unsafe.Pointer(&mem[0])), nil
}

// ExpandView runs ops from slot's bytes into view, now (the CPU backend's
// loads are complete when Acquire returns).
func (c *CPU) ExpandView(view, slot int, ops []layout.ExpandOp, stream uintptr) error {
	c.mu.Lock()
	v := c.views
	c.mu.Unlock()
	if v.mem == nil || view < 0 || int64(view+1)*v.bytes > int64(len(v.mem)) {
		return fmt.Errorf("backend cpu: view %d out of range", view)
	}
	src := c.SlotBytes(slot)
	if src == nil {
		return fmt.Errorf("backend cpu: slot %d out of range", slot)
	}
	dst := v.mem[int64(view)*v.bytes : int64(view+1)*v.bytes]
	for _, op := range ops {
		if err := op.Run(src, dst); err != nil {
			return err
		}
	}
	return nil
}

// ReleaseView does nothing: the CPU's readers are done when they return.
func (c *CPU) ReleaseView(view int, stream uintptr) error { return nil }

// freeViews unmaps the views. Holds c.mu.
func (c *CPU) freeViews() error {
	if c.views.mem == nil {
		return nil
	}
	err := syscall.Munmap(c.views.mem)
	c.views = cpuViews{}
	if err != nil {
		return fmt.Errorf("backend cpu: unmap views: %w", err)
	}
	return nil
}
