package engine

import (
	"errors"
	"fmt"
	"sync"

	"github.com/moe-infinity/moe_infinity/go/backend"
	"github.com/moe-infinity/moe_infinity/go/cache"
	"github.com/moe-infinity/moe_infinity/go/layout"
	"github.com/moe-infinity/moe_infinity/go/store"
)

// Quantized experts (FP8 block-scaled, MXFP4).
//
// The cache's slots hold each expert as the checkpoint stores it (the slot
// image of layout.BuildQuantized: the quantized values and their scales),
// so loads are plain copies of the checkpoint's pages and the host tier is
// the checkpoint itself. The caller's expert code (transformers', in
// bfloat16) reads views instead: Acquire dequantizes each expert it pins
// into one of a few view buffers (layout.Views.Expand, bit for bit as
// transformers dequantizes at load) and hands out the views' indices in
// place of slots; Release returns them. A view keeps its expert after
// Release, so an expert used again while its view was not reused is not
// dequantized again. The views are part of the memory budget, and live
// where the backend's slots do (backend.ViewMemory: device memory on a
// GPU, where kernels dequantize them from the compressed slots; the CPU
// backend runs the same program, layout.Views.Ops, in Go).

// DequantViews is the most view buffers a quantized model gets: enough for
// the experts of one decode step's layer in one Acquire, at a bounded cost
// (the caller streams a layer needing more through them in chunks).
const DequantViews = 16

// ViewsShare bounds the views to 1/ViewsShare of the memory budget (but
// one view is always made): the rest is the cache's.
const ViewsShare = 4

// ViewsPlan is what the caller's expert code reads (Plan.Views): the
// buffers Acquire's indices name and Arena's memory holds.
type ViewsPlan struct {
	// Count is the number of views; Acquire pins at most this many
	// experts at once.
	Count int `json:"count"`
	// Bytes is the size of one view in bytes (the layout's SlotBytes);
	// view i starts at i×Bytes in the arena.
	Bytes int64 `json:"bytes"`
	// Dequant is the quant_method the views are dequantized from ("fp8",
	// "mxfp4"), or "" when the views are the cache's slots themselves.
	Dequant string `json:"dequant,omitempty"`
}

// buildLayout places the slot image of spec; for quantized experts also
// the views (nil otherwise).
func buildLayout(spec layout.Spec, mods []*store.MoEModule) (*layout.Layout, *layout.Views, error) {
	var lay *layout.Layout
	var vw *layout.Views
	var err error
	if layout.Quantized(spec, mods[0]) {
		lay, vw, err = layout.BuildQuantized(spec, mods)
	} else {
		lay, err = layout.Build(spec, mods)
	}
	if errors.Is(err, layout.ErrCheckpoint) {
		return nil, nil, err
	}
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	return lay, vw, nil
}

// viewBudget splits budget between the views of a quantized model (at
// most DequantViews and a ViewsShare of the budget, never more than
// experts, at least one) and the
// cache's slots of slotBytes: it returns the number of views and the bytes
// left for slots. Without views it returns (0, budget).
func viewBudget(vw *layout.Views, slotBytes, budget int64, experts int) (int, int64, error) {
	if vw == nil {
		return 0, budget, nil
	}
	vb := vw.Layout.SlotBytes
	if budget < slotBytes+vb {
		return 0, 0, fmt.Errorf("%w: a memory budget of %s (%d bytes) holds no quantized expert: one slot of %s (%d bytes) and one dequantized view of %s (%d bytes) are needed; raise device_memory to at least %d bytes",
			ErrBudget, FormatBytes(budget), budget, FormatBytes(slotBytes), slotBytes, FormatBytes(vb), vb, slotBytes+vb)
	}
	n := int(max(1, min(int64(DequantViews), int64(experts), budget/ViewsShare/vb)))
	return n, budget - int64(n)*vb, nil
}

// viewPool is the views of a quantized model (see the comment above).
type viewPool struct {
	vw     *layout.Views
	vm     backend.ViewMemory // holds them, where the backend's slots are
	base   uintptr            // n views of stride bytes (Python wraps them)
	stride int64

	mu     sync.Mutex
	freed  *sync.Cond // signalled when views are returned or the pool closes
	closed bool
	busy   []bool
	has    []bool      // the view holds key's expert
	key    []cache.Key // its expert
	used   []uint64    // when it was last handed out (least recent is reused first)
	tick   uint64
	nfree  int
	leases map[uint64][]int
}

// newViewPool makes n views of vw's image in be's view memory.
func newViewPool(vw *layout.Views, n int, be backend.Backend) (*viewPool, error) {
	vm := backend.FeaturesOf(be).Views
	if vm == nil {
		return nil, fmt.Errorf("%w: quantized experts need dequantized views, which the %s backend cannot hold", ErrUnsupported, be.Name())
	}
	stride := vw.Layout.SlotBytes
	base, err := vm.AllocViews(n, stride)
	if err != nil {
		return nil, fmt.Errorf("%w: %d dequantized views of %d bytes: %v", ErrBudget, n, stride, err)
	}
	p := &viewPool{vw: vw, vm: vm, base: base, stride: stride, busy: make([]bool, n), has: make([]bool, n),
		key: make([]cache.Key, n), used: make([]uint64, n), nfree: n, leases: map[uint64][]int{}}
	p.freed = sync.NewCond(&p.mu)
	return p, nil
}

func (p *viewPool) count() int { return len(p.busy) }

// addr returns the address of view i.
func (p *viewPool) addr(i int) uintptr { return p.base + uintptr(int64(i)*p.stride) }

// bytes is the size of all the views.
func (p *viewPool) bytes() int64 { return int64(len(p.busy)) * p.stride }

// take gives lease one view per grant, holding grants[i]'s expert
// (dequantized from its slot unless the view still holds it), and returns
// their indices. It waits while fewer views than grants are free (the
// caller pins at most count() experts at once, so views return).
func (p *viewPool) take(lease uint64, grants []cache.Grant, stream uintptr) ([]int, error) {
	if len(grants) > len(p.busy) {
		return nil, fmt.Errorf("%w: %d experts at once, but there are %d dequantized views; acquire at most %d experts at a time",
			ErrBudget, len(grants), len(p.busy), len(p.busy))
	}
	p.mu.Lock()
	for p.nfree < len(grants) && !p.closed {
		p.freed.Wait()
	}
	if p.closed {
		p.mu.Unlock()
		return nil, ErrClosed
	}
	out := make([]int, len(grants))
	fill := make([]bool, len(grants))
	for i, g := range grants {
		best := -1
		for v := range p.busy {
			if p.busy[v] {
				continue
			}
			if p.has[v] && p.key[v] == g.Key {
				best = v
				break
			}
			if best < 0 || (p.has[best] && (!p.has[v] || p.used[v] < p.used[best])) {
				best = v
			}
		}
		fill[i] = !p.has[best] || p.key[best] != g.Key
		p.busy[best], p.has[best], p.key[best] = true, false, g.Key
		p.tick++
		p.used[best] = p.tick
		p.nfree--
		out[i] = best
	}
	p.leases[lease] = out
	p.mu.Unlock()
	var err error
	for i, g := range grants {
		if fill[i] && err == nil {
			if err = p.vm.ExpandView(out[i], g.Slot, p.vw.Ops(), stream); err != nil {
				err = fmt.Errorf("dequantizing %s: %w", g.Key, err)
			}
		}
	}
	p.mu.Lock()
	for _, v := range out {
		p.has[v] = err == nil
	}
	p.mu.Unlock()
	if err != nil {
		_ = p.give(lease, stream) // the expansion's error is the one to report
		return nil, err
	}
	return out, nil
}

// give returns lease's views (none when it holds none), the work
// submitted to stream so far being their last reader.
func (p *viewPool) give(lease uint64, stream uintptr) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	vs, ok := p.leases[lease]
	if !ok {
		return nil
	}
	delete(p.leases, lease)
	var err error
	for _, v := range vs {
		if rerr := p.vm.ReleaseView(v, stream); rerr != nil && err == nil {
			err = fmt.Errorf("recording view %d's last reader: %w", v, rerr)
		}
		p.busy[v] = false
		p.nfree++
	}
	p.freed.Broadcast()
	return err
}

// forget drops what the views hold (the cache was flushed or the
// checkpoint's experts may have changed).
func (p *viewPool) forget() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for v := range p.has {
		if !p.busy[v] {
			p.has[v] = false
		}
	}
}

// close wakes every waiting take (they fail with ErrClosed).
func (p *viewPool) close() {
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
	p.freed.Broadcast()
}

// takeViews replaces slots (Acquire's, one per experts[i]) by the views
// holding the experts dequantized, for a quantized model.
func (e *Engine) takeViews(lease uint64, experts []int32, grants []cache.Grant, pos map[int32]int, slots []int32, stream uintptr) error {
	views, err := e.views.take(lease, grants, stream)
	if err != nil {
		return err
	}
	for i, x := range experts {
		slots[i] = int32(views[pos[x]])
	}
	return nil
}
