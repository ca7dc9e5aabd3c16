package engine

import (
	"fmt"
	"time"

	"github.com/moe-infinity/moe_infinity/go/backend"
	"github.com/moe-infinity/moe_infinity/go/dtype"
)

// Hybrid execution inside CUDA-graph replays (the graph hand-off). A
// replay cannot wait on the host, so the eager hand-off (layerHybrid)
// cannot serve it; copy mode's per-layer handshake carries it instead
// (backend.CopyHandOff). A captured layer publishes its routing, its
// activations and its routing weights to a mailbox in host memory and
// waits on the device; the copy driver (copymode.go), on seeing the
// routing, runs the same choice as the eager path (cpuMisses:
// ChooseMisses over the layer's misses), pins and copies the others, has
// the CPU compute its experts' pairs from the mailbox into the layer's
// float32 partial output, and answers once the copies are queued and the
// partial is written, naming the CPU's experts on the layer's skip list.
// The layer's kernels skip those experts and add the partial only when
// the wait ended with the answer: a layer that timed out reads every miss
// in place (the CPU's experts keep their host table entries), so a late
// engine costs time, never correctness.

// graphHandOffMaxTokens bounds the tokens per captured layer the hand-off
// mailbox holds (activations, partial output): a captured layer with more
// runs without the hand-off. In tokens.
const graphHandOffMaxTokens = 64

// planGraphHandOff sets the plan's GraphHandOff and GraphHandOffOff
// (both, whatever they held): on where hybrid execution is on and the
// backend's copy mode can hand a captured layer to the CPU.
func (e *Engine) planGraphHandOff(p *ExecutorPlan) {
	p.GraphHandOff, p.GraphHandOffOff = false, ""
	switch {
	case !p.Hybrid:
		p.GraphHandOffOff = "hybrid execution is off: " + p.HybridOff
	case e.ft.CopyHandOff == nil:
		p.GraphHandOffOff = fmt.Sprintf("the %s backend's copy mode cannot hand a captured layer to the CPU", e.be.Name())
	default:
		p.GraphHandOff = true
	}
}

// setCaptureHandOff turns the backend's hand-off mailbox on for the
// capture that begins (in copy mode, with GraphHandOff) or off, sized
// for the most tokens of the mapped layer calls since the last capture
// (the warm-up steps on the capture stream), at most
// graphHandOffMaxTokens.
func (e *Engine) setCaptureHandOff(copyNext bool) error {
	ch := e.ft.CopyHandOff
	m := &e.mapped
	on := copyNext && ch != nil && e.plan.Executor.GraphHandOff
	m.mu.Lock()
	m.handNext = on
	m.mu.Unlock()
	if ch == nil {
		return nil
	}
	if !on {
		return ch.SetCopyHandOff(0, 0)
	}
	hidden, _, _, err := e.FFNShape()
	if err != nil {
		return err
	}
	tokens := min(max(m.warmT.Load(), 1), graphHandOffMaxTokens)
	return ch.SetCopyHandOff(tokens, hidden)
}

// graphCPU returns the experts of captured layer i (routing ids) that the
// CPU computes in this replay, with the layer's mailbox and its routing
// weights' type; none when the replay has no hand-off or the layer no
// mailbox.
func (e *Engine) graphCPU(it mappedItem, i int, ids []int64) (cpuPick, backend.HostWork, dtype.DType) {
	ch := e.ft.CopyHandOff
	if !it.handed || ch == nil || !e.hybridOn() {
		return cpuPick{}, backend.HostWork{}, dtype.Invalid
	}
	w, wdt, ok := ch.LayerWork(i)
	if !ok {
		return cpuPick{}, backend.HostWork{}, dtype.Invalid
	}
	l := it.layers[i]
	seen := make([]bool, e.experts)
	for _, x := range ids {
		if x >= 0 && x < int64(e.experts) {
			seen[x] = true
		}
	}
	var experts []int32 // distinct, ascending
	for x, s := range seen {
		if s {
			experts = append(experts, int32(x))
		}
	}
	return e.cpuMisses(l.Layer, experts, l.K, it.reqs, ids), w, wdt
}

// serveHandOff serves captured layer i of replay seq whose experts pick
// the CPU computes: the CPU computes their pairs from the mailbox w into
// its partial output while the backend queues the loads' copies, and the
// answer follows both (backend.CopyHandOff.ServeLayerCPU). They are
// counted as misses and offered to the cache (useOnCPU).
func (e *Engine) serveHandOff(i int, seq uint64, loads []backend.SlotLoad, l backend.CapturedLayer, ids []int64, pick cpuPick, w backend.HostWork, wdt dtype.DType) error {
	cpuX := pick.experts
	hidden, inter, dt, err := e.FFNShape()
	if err != nil {
		return err
	}
	c := FFNCall{Layer: l.Layer, T: l.Pairs / max(l.K, 1), K: l.K, DType: dt, WDType: wdt}
	done := make(chan cpuDone, 1)
	go func() {
		t0 := time.Now()
		h := &e.hybrid
		h.mu.Lock()
		err := e.cpuPart(c, cpuX, ids, w, hidden, inter)
		h.mu.Unlock()
		done <- cpuDone{time.Since(t0), err}
	}()
	e.useOnCPU(l.Layer, cpuX)
	var r cpuDone
	waited := false
	err = e.ft.CopyHandOff.ServeLayerCPU(i, seq, loads, cpuX, func() error {
		t0 := time.Now()
		r, waited = <-done, true
		e.phase(phaseCPUWait, t0)
		return r.err
	})
	if !waited {
		r = <-done // it reads the mailbox and the staging buffers
	}
	if r.err != nil { // the layer read the CPU's experts in place
		return fmt.Errorf("expert FFN of layer %d on the CPU: %w", l.Layer, r.err)
	}
	e.countCPU(l.Layer, pick, r.ns)
	return err
}
