package backend

import (
	"fmt"
	"time"
	"unsafe"

	"github.com/moe-infinity/moe_infinity/go/dtype"
)

// The CPU backend's stand-in for the copy-mode hand-off (CopyHandOff). It
// has no graphs, so a capture with the hand-off on records each layer's
// arguments, and a replay (ReplayRouting) runs like a GPU stream: a
// goroutine computes the captured layers again, in order, reading the
// caller's buffers as they are then. Each layer first publishes its
// routing, activations and routing weights (a mailbox of its own per
// publication), then waits for its answer up to CopyTimeout: answered in
// time, its experts on the skip list are null table entries and the
// partial is its Addend; timed out, it reads every expert from its table,
// as the CUDA kernels do.

var _ CopyHandOff = (*CPU)(nil)

// defaultCopyTimeout is CPU.CopyTimeout's default.
const defaultCopyTimeout = 2 * time.Second

// cpuHand is the hand-off's state (guarded by cpuCapture.mu).
type cpuHand struct {
	tokens, hidden int64     // in force for the capture (tokens 0: off)
	args           []FFNArgs // per captured layer, as captured
	cur            []*cpuBox // per captured layer: the mailbox AwaitLayer returned last
	answered       []uint64  // per captured layer: the last sequence number answered
	late           bool      // a layer timed out since the last answer
	replay         chan struct{}
}

// cpuBox is one publication's mailbox.
type cpuBox struct {
	seq       uint64
	x, w      []byte
	wdtype    dtype.DType
	partial   []float32
	skip      []bool // the experts the CPU computed (valid with partialOK)
	partialOK bool
}

func (h *cpuHand) begin(copyMode bool, next [2]int64) {
	h.tokens, h.hidden, h.args = 0, 0, nil
	if copyMode {
		h.tokens, h.hidden = next[0], next[1]
	}
}

func (h *cpuHand) end(n int) {
	h.cur, h.answered, h.late = make([]*cpuBox, n), make([]uint64, n), false
}

// SetCopyHandOff selects the hand-off's mailbox for the copy-mode captures
// that follow (tokens 0: off).
func (c *CPU) SetCopyHandOff(tokens, hidden int64) error {
	if tokens < 0 || (tokens > 0 && hidden <= 0) {
		return fmt.Errorf("backend cpu: a hand-off mailbox of %d tokens × %d", tokens, hidden)
	}
	c.capture.mu.Lock()
	defer c.capture.mu.Unlock()
	c.capture.handNext = [2]int64{tokens, hidden}
	return nil
}

// LayerWork returns the mailbox of captured layer i's publication that
// AwaitLayer returned last.
func (c *CPU) LayerWork(i int) (HostWork, dtype.DType, bool) {
	c.capture.mu.Lock()
	defer c.capture.mu.Unlock()
	if i < 0 || i >= len(c.capture.hand.cur) || c.capture.hand.cur[i] == nil {
		return HostWork{}, dtype.Invalid, false
	}
	b := c.capture.hand.cur[i]
	return HostWork{X: uint64(uintptr(unsafe.Pointer(&b.x[0]))), Weights: uint64(uintptr(unsafe.Pointer(&b.w[0]))),
		Partial: uint64(uintptr(unsafe.Pointer(&b.partial[0])))}, b.wdtype, true
}

// ServeLayerCPU fills the loads' slots, waits for the CPU's partial, puts
// cpu on the skip list of the publication being served and answers it.
// Without the hand-off it is the copy-mode stand-in's ServeLayer.
func (c *CPU) ServeLayerCPU(i int, seq uint64, loads []SlotLoad, cpu []int32, partial func() error) error {
	fillErr := c.fillLoads(loads)
	cp := &c.capture
	cp.mu.Lock()
	on := cp.copyMode && cp.hand.tokens > 0 && i >= 0 && i < len(cp.hand.cur)
	var box *cpuBox
	if on {
		box = cp.hand.cur[i]
		if box != nil && box.seq != seq {
			box = nil // an answer ahead of the routing (the engine closing)
		}
	}
	cp.mu.Unlock()
	var perr error
	if len(cpu) > 0 {
		switch {
		case partial == nil:
			perr = fmt.Errorf("backend cpu: experts %v of captured layer %d handed to the CPU without a partial", cpu, i)
		case box == nil:
			_ = partial()
			perr = fmt.Errorf("backend cpu: captured layer %d has no hand-off mailbox", i)
		default:
			perr = partial()
		}
	}
	if !on {
		if perr != nil {
			return perr
		}
		return fillErr
	}
	E := 0
	if m := c.mapped.Load(); m != nil {
		E = m.Experts
	}
	cp.mu.Lock()
	if box != nil {
		box.skip, box.partialOK = nil, false
		if len(cpu) > 0 && perr == nil {
			box.skip = make([]bool, E)
			for _, x := range cpu {
				if x >= 0 && int(x) < E {
					box.skip[x] = true
				}
			}
			box.partialOK = true
		}
	}
	if seq > cp.hand.answered[i] {
		cp.hand.answered[i] = seq
	}
	late := cp.hand.late
	cp.hand.late = false
	cp.signal()
	cp.mu.Unlock()
	switch {
	case perr != nil:
		return perr
	case fillErr != nil:
		return fillErr
	case late:
		return ErrLate
	}
	return nil
}

// signal wakes AwaitLayer and waiting replay layers (call with mu held).
func (cp *cpuCapture) signal() {
	close(cp.changed)
	cp.changed = make(chan struct{})
}

// handReplay starts one replay of a hand-off capture after the previous
// one (stream order) and returns its routing, ready once every layer ran.
func (c *CPU) handReplay(m *MapTable, layers []CapturedLayer) (*Routing, error) {
	cp := &c.capture
	m.Mu.RLock()
	var snap []bool
	for _, l := range layers {
		snap = append(snap, m.Snapshot(l.Layer)...)
	}
	m.Mu.RUnlock()
	cp.mu.Lock()
	prev, done := cp.hand.replay, make(chan struct{})
	cp.hand.replay = done
	args, captured := cp.hand.args, cp.captured
	cp.mu.Unlock()
	var ids []int64
	var err error
	go func() {
		defer close(done)
		if prev != nil {
			<-prev
		}
		for i, a := range args {
			got, e := c.replayLayer(m, i, captured[i].Layer, a)
			if e != nil && err == nil {
				err = e
			}
			ids = append(ids, got...)
		}
	}()
	return NewRouting(snap, func() ([]int64, error) { <-done; return ids, err }, nil), nil
}

// replayLayer publishes captured layer i (MoE layer `layer`, captured with
// a), waits for its answer and computes it.
func (c *CPU) replayLayer(m *MapTable, i, layer int, a FFNArgs) ([]int64, error) {
	cp := &c.capture
	P := a.T * a.K
	ids := append([]int64(nil), unsafe.Slice((*int64)(HostPtr(a.TopK)), P)...)
	cp.mu.Lock()
	tokens, hidden := cp.hand.tokens, cp.hand.hidden
	cp.mu.Unlock()
	var box *cpuBox
	if a.T <= tokens && a.Hidden == hidden && a.FP8 == nil && IsRoutingWeightsDType(a.WDType) {
		wsize := int64(a.WDType.Size())
		box = &cpuBox{
			x:      append([]byte(nil), unsafe.Slice((*byte)(HostPtr(a.X)), 2*a.T*a.Hidden)...),
			w:      append([]byte(nil), unsafe.Slice((*byte)(HostPtr(a.Weights)), wsize*P)...),
			wdtype: a.WDType, partial: make([]float32, a.T*a.Hidden),
		}
	}
	timeout := c.CopyTimeout
	if timeout <= 0 {
		timeout = defaultCopyTimeout
	}
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	cp.mu.Lock()
	cp.counter[i]++
	seq := cp.counter[i]
	if box != nil {
		box.seq = seq
	}
	cp.pub[i] = append(cp.pub[i], cpuPub{seq: seq, ids: ids, box: box})
	cp.signal()
	timedOut := false
	for cp.hand.answered[i] < seq && !timedOut {
		ch := cp.changed
		cp.mu.Unlock()
		select {
		case <-ch:
		case <-timer.C:
			timedOut = true
		}
		cp.mu.Lock()
	}
	answered := cp.hand.answered[i] >= seq
	if !answered {
		cp.hand.late = true
	}
	var skip []bool
	if answered && box != nil && box.partialOK {
		skip = box.skip
		a.Addend = uint64(uintptr(unsafe.Pointer(&box.partial[0])))
	}
	cp.mu.Unlock()
	m.Mu.RLock()
	defer m.Mu.RUnlock()
	return ids, c.mappedCompute(m, layer, a, skip)
}
