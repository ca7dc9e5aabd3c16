package engine

import (
	"errors"
	"fmt"
	"runtime"
	"time"

	"github.com/moe-infinity/moe_infinity/go/backend"
	"github.com/moe-infinity/moe_infinity/go/cache"
)

// Copy mode: a captured step's layers get their missed experts from the
// copy engine instead of reading them in place. As a replay reaches a
// layer, the layer publishes its routing and waits on the device; the
// engine's copy driver (one goroutine) pins the layer's experts in the
// cache, has the backend copy the misses into the slots it chose and lets
// the layer run. The replay's routing still reaches the tracer afterwards
// for the expert-activation trace and the priorities; hits, misses and
// loads are counted by the driver (cache.Pin), and the tracer neither
// admits nor plans prefetches for served replays.
//
// Every slot a layer's copies overwrite was last read by kernels ordered
// before the layer's routing (earlier layers of the replay, earlier
// replays), and the kernels after the layer read the tables only once the
// copies are done, so the driver needs no events from the compute stream:
// that is what lets it work inside a replay.

// closedStop is an already-closed stop channel: cache.Pin with it never
// waits (a layer waiting inside a replay must not wait on other pins).
var closedStop = func() chan struct{} { c := make(chan struct{}); close(c); return c }()

// resolveGraphMisses is Config.GraphMisses with "auto" decided by
// ChooseGraphMisses from the link rates (given or measured) and the expert
// size.
func (e *Engine) resolveGraphMisses() string {
	if e.cfg.GraphMisses != "auto" {
		return e.cfg.GraphMisses
	}
	if e.lay == nil {
		return "read"
	}
	copyMode := e.ft.CopyGraphs != nil
	return ChooseGraphMisses(e.lay.SlotBytes, e.rates, copyMode)
}

// graphMissesNow is resolveGraphMisses under the engine's lock.
func (e *Engine) graphMissesNow() string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.resolveGraphMisses()
}

// copyGraphs returns the backend's copy mode, or nil when it has none.
func (e *Engine) copyGraphs() backend.CopyGraphs {
	cg := e.ft.CopyGraphs
	return cg
}

// slowPin is the slot choice past which phasePinSlow counts it (the
// choice takes ~0.5 µs: BenchmarkCopyLayerLoads).
const slowPin = 10 * time.Microsecond

// copyDriver serves copy-mode replays in order, then hands each to the
// tracer. On Close it lets the layers of replays still queued or in flight
// run without copies, so that no replay is left waiting.
func (e *Engine) copyDriver(cg backend.CopyGraphs) {
	defer e.bg.Done()
	// One OS thread for the driver's life: the backend's calls find their
	// context current, and a replayed layer's reaction never waits for the
	// goroutine to be scheduled onto another thread.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	m := &e.mapped
	for {
		var it mappedItem
		select {
		case it = <-m.copyQ:
		case <-e.stop:
			e.releaseQueued(cg)
			return
		}
		if at, err := e.serveReplay(cg, it); err != nil {
			if errors.Is(err, backend.ErrClosed) {
				e.releaseLayers(cg, at, len(it.layers))
				it.r.Done()
				e.mappedDone(nil)
				e.releaseQueued(cg)
				return
			}
			e.mappedErr(err)
		}
		select {
		case m.q <- it:
		case <-e.stop:
			it.r.Done()
			e.mappedDone(nil)
			e.releaseQueued(cg)
			return
		}
	}
}

// serveReplay serves each layer of one replay; it returns the index of the
// layer it stopped at when stopped. Errors other than a stop are returned
// after every layer has been let run.
func (e *Engine) serveReplay(cg backend.CopyGraphs, it mappedItem) (int, error) {
	m := &e.mapped
	var first error
	for i, l := range it.layers {
		ids, seq, err := cg.AwaitLayer(i, e.stop)
		if err != nil {
			return i, err
		}
		t0 := time.Now()
		pick, work, wdt := e.graphCPU(it, i, ids)
		loads, grants, err := e.layerLoads(l, ids, pick.experts)
		if first == nil {
			first = err
		}
		pin := time.Since(t0)
		e.phaseNs[phasePin].Add(int64(pin))
		if pin > slowPin {
			e.phaseNs[phasePinSlow].Add(int64(pin))
		}
		if len(pick.experts) > 0 {
			err = e.serveHandOff(i, seq, loads, l, ids, pick, work, wdt)
		} else {
			err = cg.ServeLayer(i, seq, loads)
		}
		m.served[i] = seq
		if errors.Is(err, backend.ErrLate) {
			m.late.Add(1) // the copies went well; a layer did not wait for them
			err = nil
		}
		if err == nil {
			e.bytesMoved[l.Layer].Add(int64(len(loads)) * e.lay.SlotBytes)
		} else if first == nil {
			first = fmt.Errorf("copying the misses of layer %d: %w", l.Layer, err)
		}
		for _, g := range grants {
			if g.Load {
				e.cache.Complete(g.Slot, g.Gen, err)
			}
		}
		e.cache.Unpin(grants)
		e.phaseNs[phaseServe].Add(int64(time.Since(t0)))
	}
	return len(it.layers), first
}

// layerLoads pins the distinct experts of one layer's routing, but those
// the CPU computes (cpuX), and returns the copies the misses need. Ids out
// of range are skipped (the kernels skip them too; the tracer reports
// them). When the layer needs more experts than there are free or
// evictable slots, nothing is pinned and its misses are read in place.
func (e *Engine) layerLoads(l backend.CapturedLayer, ids []int64, cpuX []int32) ([]backend.SlotLoad, []cache.Grant, error) {
	m := &e.mapped
	if cap(m.seen) < e.experts {
		m.seen = make([]bool, e.experts)
	}
	seen := m.seen[:e.experts]
	clear(seen)
	for _, x := range cpuX {
		seen[x] = true
	}
	keys := m.keys[:0]
	var bad error
	for p, x := range ids {
		if x < 0 || x >= int64(e.experts) {
			if bad == nil {
				bad = fmt.Errorf("%w: layer %d: token %d routes to expert %d, out of range [0, %d)", ErrInvalid, l.Layer, int64(p)/max(l.K, 1), x, e.experts)
			}
			continue
		}
		if !seen[x] {
			seen[x] = true
			keys = append(keys, cache.Key{Layer: int32(l.Layer), Expert: int32(x)})
		}
	}
	m.keys = keys
	grants, err := e.cache.Pin(keys, closedStop)
	if err != nil {
		// Too many experts for the slots (or none evictable): read in place.
		hits := make([]bool, len(keys))
		for i, k := range keys {
			_, st := e.cache.Lookup(k)
			hits[i] = st == cache.Ready
		}
		e.cache.Touch(keys, hits)
		return nil, nil, bad
	}
	var loads []backend.SlotLoad
	for _, g := range grants {
		if g.Load {
			loads = append(loads, backend.SlotLoad{Slot: g.Slot, Layer: int(g.Key.Layer), Expert: int(g.Key.Expert)})
		}
	}
	return loads, grants, bad
}

// releaseLayers lets captured layers [from, to) of the next replay run
// without copies (the answer is given ahead of their routing).
func (e *Engine) releaseLayers(cg backend.CopyGraphs, from, to int) {
	m := &e.mapped
	for j := from; j < to; j++ {
		m.served[j]++
		_ = cg.ServeLayer(j, m.served[j], nil)
	}
}

// releaseQueued releases every layer of the replays still queued.
func (e *Engine) releaseQueued(cg backend.CopyGraphs) {
	m := &e.mapped
	for {
		select {
		case it := <-m.copyQ:
			e.releaseLayers(cg, 0, len(it.layers))
			it.r.Done()
			e.mappedDone(nil)
		default:
			return
		}
	}
}

// mappedErr keeps err for the next call (the first one wins).
func (e *Engine) mappedErr(err error) {
	m := &e.mapped
	m.mu.Lock()
	if m.asyncErr == nil {
		m.asyncErr = err
	}
	m.mu.Unlock()
}
