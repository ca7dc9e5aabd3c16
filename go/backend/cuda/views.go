//go:build cuda

package cuda

import (
	"fmt"
	"sync/atomic"

	"gorgonia.org/cu"

	"github.com/moe-infinity/moe_infinity/go/dtype"
	"github.com/moe-infinity/moe_infinity/go/layout"
)

// viewThreads is the block size of the view kernels; viewBlocks bounds
// their grid (grid-stride loops cover the rest).
const (
	viewThreads = 256
	viewBlocks  = 4096
)

// views is the device memory of quantized experts' dequantized views
// (backend.ViewMemory): n views of bytes each, with the event recorded
// after each view's last reader.
type views struct {
	base    uint64
	n       int
	bytes   int64
	last    []uintptr     // per view: recorded by ReleaseView
	used    []atomic.Bool // per view: last was recorded
	convert cu.Function
	fp8     cu.Function
	mxfp4t  cu.Function
}

// AllocViews allocates n zeroed views of bytes each in device memory.
func (b *Backend) AllocViews(n int, bytes int64) (uintptr, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.opened || b.closed {
		return 0, fmt.Errorf("backend cuda: views need an open backend")
	}
	if b.views != nil {
		return 0, fmt.Errorf("backend cuda: views are already allocated")
	}
	size := int64(n) * bytes
	if n < 1 || bytes < 1 || size/int64(n) != bytes || size%4 != 0 {
		return 0, fmt.Errorf("backend cuda: %d views of %d bytes cannot be allocated", n, bytes)
	}
	v := &views{n: n, bytes: bytes, last: make([]uintptr, n), used: make([]atomic.Bool, n)}
	err := b.dev.do(func() error {
		var err error
		for _, f := range []struct {
			dst  *cu.Function
			name string
		}{{&v.convert, "moe_view_convert"}, {&v.fp8, "moe_view_fp8"}, {&v.mxfp4t, "moe_view_mxfp4t"}} {
			if *f.dst, err = b.mod.Function(f.name); err != nil {
				return fmt.Errorf("backend cuda: kernel %s: %w", f.name, err)
			}
		}
		for i := range v.last {
			if v.last[i], err = eventCreate(); err != nil {
				return err
			}
		}
		if v.base, err = memAlloc(size); err != nil {
			return fmt.Errorf("backend cuda: %d views of %d bytes: %w", n, bytes, err)
		}
		// Zeroed once: the padding between a view's parts is never written.
		if err := memset32Async(v.base, 0, size/4, b.demand); err != nil {
			return err
		}
		return streamSync(b.demand)
	})
	if err != nil {
		b.freeViewsLocked(v, func(error) {})
		return 0, err
	}
	b.views = v
	return uintptr(v.base), nil
}

// viewType is the view kernels' code of t (0 bfloat16, 1 float16, 2
// float32).
func viewType(t dtype.DType) (uint64, error) {
	switch t {
	case dtype.BF16:
		return 0, nil
	case dtype.F16:
		return 1, nil
	case dtype.F32:
		return 2, nil
	}
	return 0, fmt.Errorf("backend cuda: the view kernels read and write bfloat16, float16 and float32, not %s", t)
}

// ExpandView launches ops on stream, from slot's image into view's, after
// view's last reader.
func (b *Backend) ExpandView(view, slot int, ops []layout.ExpandOp, stream uintptr) error {
	b.mu.Lock()
	v := b.views
	ok := b.opened && !b.closed && slot >= 0 && slot < b.slots
	b.mu.Unlock()
	if v == nil || !ok || view < 0 || view >= v.n {
		return fmt.Errorf("backend cuda: view %d or slot %d out of range (or no views)", view, slot)
	}
	src := b.arena + uint64(int64(slot)*b.slotSize)
	dst := v.base + uint64(int64(view)*v.bytes)
	return b.dev.do(func() error {
		if v.used[view].Load() {
			if err := streamWait(stream, v.last[view]); err != nil {
				return err
			}
		}
		for _, op := range ops {
			if op.Dst < 0 || op.Dst+op.DstBytes > v.bytes || op.Src < 0 || op.Src+op.SrcBytes > b.slotSize {
				return fmt.Errorf("backend cuda: expand op %+v outside a view of %d bytes or a slot of %d", op, v.bytes, b.slotSize)
			}
			if err := b.expandOp(v, op, dst, src, stream); err != nil {
				return err
			}
		}
		return nil
	})
}

// expandOp launches one op. Runs inside do.
func (b *Backend) expandOp(v *views, op layout.ExpandOp, dst, src uint64, stream uintptr) error {
	vt, err := viewType(op.DstType)
	if err != nil {
		return err
	}
	elems := op.DstBytes / int64(op.DstType.Size())
	grid := int(min(viewBlocks, max(1, (elems+viewThreads-1)/viewThreads)))
	d, s, sc := dst+uint64(op.Dst), src+uint64(op.Src), src+uint64(op.Scales)
	switch op.Kind {
	case layout.ExpandConvert:
		if op.SrcType == op.DstType {
			return copyDtoDAsync(d, s, op.DstBytes, stream)
		}
		st, err := viewType(op.SrcType)
		if err != nil {
			return err
		}
		return launch(v.convert, grid, 1, viewThreads, stream, d, vt, s, st, uint64(elems))
	case layout.ExpandFP8Block:
		sct, err := viewType(op.ScaleType)
		if err != nil || sct == 1 {
			return fmt.Errorf("backend cuda: FP8 scales of dtype %s (want float32 or bfloat16)", op.ScaleType)
		}
		return launch(v.fp8, grid, 1, viewThreads, stream, d, vt, s, sc, sct,
			uint64(op.Rows), uint64(op.Cols), uint64(op.BlockRows), uint64(op.BlockCols))
	case layout.ExpandMXFP4T:
		if op.Cols%32 != 0 {
			return fmt.Errorf("backend cuda: MXFP4 weight of %d columns (a multiple of 32 is needed)", op.Cols)
		}
		return launch(v.mxfp4t, grid, 1, viewThreads, stream, d, vt, s, sc, uint64(op.Rows), uint64(op.Cols))
	}
	return fmt.Errorf("backend cuda: unknown expand op kind %d", op.Kind)
}

// ReleaseView records stream's work so far as view's last reader.
func (b *Backend) ReleaseView(view int, stream uintptr) error {
	b.mu.Lock()
	v := b.views
	b.mu.Unlock()
	if v == nil || view < 0 || view >= v.n {
		return fmt.Errorf("backend cuda: view %d out of range (or no views)", view)
	}
	return b.dev.do(func() error {
		if err := eventRecord(v.last[view], stream); err != nil {
			return err
		}
		v.used[view].Store(true)
		return nil
	})
}

// freeViewsLocked frees v's memory and events. Holds b.mu.
func (b *Backend) freeViewsLocked(v *views, keep func(error)) {
	if v == nil {
		return
	}
	keep(b.dev.do(func() error {
		for _, e := range v.last {
			if e != 0 {
				keep(eventSync(e))
				keep(eventDestroy(e))
			}
		}
		if v.base != 0 {
			keep(memFree(v.base))
		}
		return nil
	}))
}
