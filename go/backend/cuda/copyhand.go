//go:build cuda

package cuda

import (
	"errors"
	"fmt"
	"unsafe"

	"github.com/moe-infinity/moe_infinity/go/backend"
	"github.com/moe-infinity/moe_infinity/go/dtype"
)

// The copy-mode hand-off (backend.CopyHandOff): hybrid execution inside
// graph replays. A captured layer with a mailbox runs
//
//	moe_publish_wait: routing ids, x and the routing weights → its mailbox
//	                  (pinned, device-mapped), then the wait as in copy mode;
//	                  once it ends, the host's skip list → the device's
//	                  (zeroes after a timeout)
//	moe_gate_up_swiglu, moe_down over the layer's table and skip list, the
//	                  partial (pinned, read in place) as moe_down's addend
//
// and the engine, serving the layer (ServeLayerCPU), queues the copies,
// waits for the CPU's partial, writes the skip list (one byte per expert
// the CPU computed, then one byte that says the partial is written) and
// answers. Table entries are never nulled: a layer that timed out reads
// every miss in place, as copy mode does.

var _ backend.CopyHandOff = (*Backend)(nil)

// copyHand is the hand-off's memory: mailbox j (< slots) at j·stride in
// the pinned area holds x ([tokens·hidden] 2-byte elements), the routing
// weights (wBytes), the partial output (float32 [tokens·hidden]) and the
// host skip list (skipBytes); the device skip lists are skipBytes each.
type copyHand struct {
	tokens, hidden, experts        int64
	slots                          int
	xBytes, wBytes, pBytes, stride int64
	skipBytes                      int64
	host                           unsafe.Pointer
	hostDev                        uint64
	skipDev                        uint64
	on                             bool        // in force for the last capture
	layers                         []handLayer // per captured layer
}

// handLayer is one captured layer's hand-off: whether it has a mailbox
// (number mb) and its routing weights' type.
type handLayer struct {
	ok     bool
	mb     int
	wdtype dtype.DType
}

func align16(n int64) int64 { return (n + 15) &^ 15 }

func (h *copyHand) off(j int) int64 { return int64(j) * h.stride }

// SetCopyHandOff selects the hand-off's mailboxes for the copy-mode
// captures that follow (tokens 0: off).
func (b *Backend) SetCopyHandOff(tokens, hidden int64) error {
	m := b.m.Load()
	if m == nil {
		return fmt.Errorf("backend cuda: mapped mode is off")
	}
	if tokens < 0 || (tokens > 0 && hidden <= 0) {
		return fmt.Errorf("backend cuda: a hand-off mailbox of %d tokens × %d", tokens, hidden)
	}
	m.capMu.Lock()
	defer m.capMu.Unlock()
	m.handNext = [2]int64{tokens, hidden}
	return nil
}

// beginCopyHand makes (or remakes, for other sizes) the hand-off's memory
// for the capture that begins and empties its skip lists, after the
// compute stream's work. Runs in do, with capMu held for writing.
func (b *Backend) beginCopyHand(m *mapped, c *copyState) error {
	tokens, hidden := m.handNext[0], m.handNext[1]
	if c.hand != nil {
		c.hand.on, c.hand.layers = false, c.hand.layers[:0]
	}
	if tokens <= 0 {
		return nil
	}
	E := int64(m.tab.Experts)
	h := c.hand
	if h == nil || h.tokens != tokens || h.hidden != hidden || h.experts != E {
		if h != nil {
			if err := freeHand(h); err != nil {
				return err
			}
			c.hand = nil
		}
		h = &copyHand{tokens: tokens, hidden: hidden, experts: E, slots: m.tab.Layers}
		h.xBytes = align16(2 * tokens * hidden)
		h.wBytes = align16(4 * tokens * E) // [T, K] float32 at most, K <= E
		h.pBytes = align16(4 * tokens * hidden)
		h.skipBytes = align16(E + 1)
		h.stride = h.xBytes + h.wBytes + h.pBytes + h.skipBytes
		var err error
		if h.host, err = hostAllocMapped(int64(h.slots) * h.stride); err != nil {
			return err
		}
		if h.hostDev, err = hostDevicePtr(h.host); err != nil {
			_ = hostFree(h.host)
			return err
		}
		if h.skipDev, err = memAlloc(int64(h.slots) * h.skipBytes); err != nil {
			_ = hostFree(h.host)
			return err
		}
		c.hand = h
	}
	for j := range h.slots {
		clear(h.skipHost(j))
	}
	if err := memset32Async(h.skipDev, 0, int64(h.slots)*h.skipBytes/4, b.prefetch); err != nil {
		return err
	}
	h.on = true
	return nil
}

// skipHost is mailbox j's host skip list.
func (h *copyHand) skipHost(j int) []byte {
	return unsafe.Slice((*byte)(unsafe.Add(h.host, h.off(j)+h.xBytes+h.wBytes+h.pBytes)), h.skipBytes)
}

// captureHand gives captured layer i (arguments a) a mailbox when it fits
// one: it returns moe_publish_wait's nine hand-off parameters, and the
// device skip list and the partial's device address for the layer's
// kernels (all 0 without one). Runs in do, during the capture.
func (b *Backend) captureHand(m *mapped, i int, a backend.FFNArgs) (params [9]uint64, skip, addend uint64) {
	h := m.cp.hand
	if h == nil || !h.on {
		return params, 0, 0
	}
	wsize := int64(a.WDType.Size())
	P := a.T * a.K
	if i != len(h.layers) || i >= h.slots || a.T > h.tokens || a.Hidden != h.hidden || a.FP8 != nil || !backend.IsRoutingWeightsDType(a.WDType) || P*wsize > h.wBytes {
		h.layers = append(h.layers, handLayer{})
		return params, 0, 0
	}
	base := h.hostDev + uint64(h.off(i))
	xbox, wbox, part, skipH := base, base+uint64(h.xBytes), base+uint64(h.xBytes+h.wBytes), base+uint64(h.xBytes+h.wBytes+h.pBytes)
	skip = h.skipDev + uint64(int64(i)*h.skipBytes)
	params = [9]uint64{a.X, uint64(a.T * a.Hidden), a.Weights, uint64(P * wsize / 2), xbox, wbox, skipH, skip, uint64(h.skipBytes / 4)}
	h.layers = append(h.layers, handLayer{ok: true, mb: i, wdtype: a.WDType})
	return params, skip, part
}

// LayerWork returns captured layer i's mailbox.
func (b *Backend) LayerWork(i int) (backend.HostWork, dtype.DType, bool) {
	m := b.m.Load()
	if m == nil || m.cp == nil || m.cp.hand == nil || !m.copyMode {
		return backend.HostWork{}, dtype.Invalid, false
	}
	h := m.cp.hand
	if !h.on || i < 0 || i >= len(h.layers) || !h.layers[i].ok {
		return backend.HostWork{}, dtype.Invalid, false
	}
	l := h.layers[i]
	base := uintptr(h.host) + uintptr(h.off(l.mb))
	return backend.HostWork{X: uint64(base), Weights: uint64(base + uintptr(h.xBytes)), Partial: uint64(base + uintptr(h.xBytes+h.wBytes))}, l.wdtype, true
}

// ServeLayerCPU queues the loads' copies, waits for the CPU's partial,
// writes captured layer i's skip list and answers.
func (b *Backend) ServeLayerCPU(i int, seq uint64, loads []backend.SlotLoad, cpu []int32, partial func() error) error {
	return b.serveLayer(i, seq, loads, cpu, partial)
}

// handSkip writes captured layer i's host skip list before its answer:
// cpu's experts and the partial's flag when ok, else nothing. Without a
// mailbox, cpu must be empty.
func (b *Backend) handSkip(m *mapped, i int, cpu []int32, ok bool) error {
	h := m.cp.hand
	if h == nil || !h.on || i >= len(h.layers) || !h.layers[i].ok {
		if len(cpu) > 0 {
			return fmt.Errorf("backend cuda: captured layer %d has no hand-off mailbox", i)
		}
		return nil
	}
	s := h.skipHost(h.layers[i].mb)
	clear(s)
	if !ok || len(cpu) == 0 {
		return nil
	}
	for _, x := range cpu {
		if x < 0 || int64(x) >= h.experts {
			clear(s)
			return fmt.Errorf("backend cuda: expert %d handed to the CPU, out of range [0, %d)", x, h.experts)
		}
		s[x] = 1
	}
	s[h.experts] = 1 // the partial is written
	return nil
}

// freeHand releases the hand-off's memory. Runs in do.
func freeHand(h *copyHand) error {
	var errs []error
	if h.host != nil {
		errs = append(errs, hostFree(h.host))
	}
	if h.skipDev != 0 {
		errs = append(errs, memFree(h.skipDev))
	}
	return errors.Join(errs...)
}
