package engine

import (
	"time"

	"github.com/moe-infinity/moe_infinity/go/cache"
)

// Phases of the one-call-per-layer path whose host time is accounted.
const (
	phaseObserve = iota
	phaseAcquire
	phaseKernels
	phaseRelease
	phaseTrace // mapped mode: the tracer goroutine, off the compute path
	phaseServe // copy mode: the driver's host time per layer, while the layer waits
	phasePin   // copy mode: the part of phaseServe spent choosing slots (cache.Pin)
	// copy mode: the part of phasePin in choices that took over
	// slowPin (a stall: the choice itself takes under a microsecond)
	phasePinSlow
	// hybrid execution (layerHybrid, hostPartial, serveHandOff): handing
	// a layer's activations out to the host, waiting for the CPU's part
	// once the device's experts are on their way (the time the CPU adds
	// to the layer), and handing its partial output back
	phaseHandOut
	phaseCPUWait
	phaseHandBack
	numPhases
)

var phaseNames = [numPhases]string{"observe", "acquire", "kernels", "release", "trace_async", "serve", "serve_pin", "serve_pin_slow",
	"hand_out", "cpu_wait", "hand_back"}

// phase adds the time since t0 to phase p and returns now.
func (e *Engine) phase(p int, t0 time.Time) time.Time {
	now := time.Now()
	e.phaseNs[p].Add(int64(now.Sub(t0)))
	return now
}

// LayerStats are the counters of one MoE layer.
type LayerStats struct {
	cache.LayerStats
	// BytesMoved counts bytes copied into the device tier (demand and
	// prefetch loads).
	BytesMoved int64 `json:"bytes_moved"`
	// StallNs is the time Acquire spent waiting for copies, in
	// nanoseconds.
	StallNs int64 `json:"stall_ns"`
	// CPUComputed counts experts the CPU computed from host memory
	// instead of a slot (hybrid execution, ChooseMisses: one per expert
	// per layer call); they are among Misses but never loaded or admitted.
	CPUComputed int64 `json:"cpu_computed"`
	// CPUNs is the CPU's time for them, in nanoseconds: staging them from
	// mapped files and their share of the layer's FFN call (on the CPU
	// backend one call computes the slot experts and the CPU's together;
	// each expert's weights are read once, so each counts an equal share).
	CPUNs int64 `json:"cpu_ns"`
	// MissPlanNs is what the hybrid cost model expects the layer's misses
	// to take (ChooseMisses' FinishS: the link's and the CPU's queues run
	// together, fixed costs included), summed over the layer calls whose
	// misses hybrid execution planned, in nanoseconds: with the compute
	// time, the hybrid floor against which a hybrid decode is measured.
	MissPlanNs int64 `json:"miss_plan_ns"`
	// ExpertTokens counts, per expert of the layer, the tokens routed to
	// it (Observe and the routing of Layer's calls on every path, mapped
	// and replayed layers included) since the last reset: a token counts
	// once for each of its top-k experts, and a share of one when a
	// layer's tokens could not be split between its requests. Per layer
	// only; absent from the totals.
	ExpertTokens []float64 `json:"expert_tokens,omitempty"`
}

// Stats are the engine's counters, totalled and per layer.
type Stats struct {
	LayerStats
	// Acquires counts successful Acquire calls.
	Acquires int64 `json:"acquires"`
	// Slots and SlotBytes describe the cache.
	Slots     int   `json:"slots"`
	SlotBytes int64 `json:"slot_bytes"`
	// Resident is the number of experts currently ready in the cache.
	Resident int `json:"resident"`
	// EAMCSize is the number of EAMs in the collection.
	EAMCSize int `json:"eamc_size"`
	// ActiveRequests is the number of requests being traced.
	ActiveRequests int `json:"active_requests"`
	// PrefetchQueued is the number of prefetches waiting.
	PrefetchQueued int `json:"prefetch_queued"`
	// PrefetchCancelled counts queued prefetches cancelled by re-planning.
	PrefetchCancelled uint64 `json:"prefetch_cancelled"`
	// GraphMisses is how the next captured step will get its missed
	// experts: "read" or "copy" (Config.GraphMisses resolved).
	GraphMisses string `json:"graph_misses"`
	// CopyLate counts copy-mode layers that stopped waiting for the copy
	// driver (the backend's timeout) and read their misses in place.
	CopyLate int64 `json:"copy_late"`
	// Paths counts the executor's layer calls by the path they took
	// ("mapped", "kernels", "host-stream", "host-stacked", "need-routing").
	Paths map[string]int64 `json:"paths"`
	// MappedOff is why mapped mode could not start ("" when it could, or
	// was never tried).
	MappedOff string `json:"mapped_off,omitempty"`
	// CPUScale is how many times longer than the probe measured at
	// Configure the CPU's experts took in use (CPUCalibration: 1 until a
	// hybrid layer call is observed); the cost model's CPU side is scaled
	// by it. Model state, not a counter: ResetStats keeps it.
	CPUScale float64 `json:"cpu_scale"`
	// CPUScaleCalls is the number of hybrid layer calls behind CPUScale.
	CPUScaleCalls int64 `json:"cpu_scale_calls"`
	// PhaseNs is host time by phase of Layer/LayerFFN calls, in
	// nanoseconds: where the engine's own overhead goes.
	PhaseNs map[string]int64 `json:"phase_ns"`
	// Layers holds the per-layer counters in execution order.
	Layers []LayerStats `json:"layers"`
}

// Stats returns a snapshot of the counters.
func (e *Engine) Stats() (Stats, error) {
	if err := e.readyLocked(); err != nil {
		return Stats{}, err
	}
	e.drainMapped()
	cs := e.cache.Stats()
	out := Stats{
		Acquires:          e.acquires.Load(),
		Slots:             e.plan.Slots,
		SlotBytes:         e.plan.SlotBytes,
		Resident:          len(e.cache.Resident()),
		EAMCSize:          e.tracker.Collection().Len(),
		ActiveRequests:    e.tracker.Active(),
		PrefetchQueued:    e.queue.Len(),
		PrefetchCancelled: e.queue.Cancellations(),
		CopyLate:          e.mapped.late.Load(),
		GraphMisses:       e.graphMissesNow(),
		CPUScale:          e.hybrid.cal.Scale(),
		CPUScaleCalls:     e.hybrid.cal.Calls(),
		Layers:            make([]LayerStats, len(cs)),
		PhaseNs:           make(map[string]int64, numPhases),
	}
	for p, name := range phaseNames {
		out.PhaseNs[name] = e.phaseNs[p].Load()
	}
	out.Paths = make(map[string]int64, len(pathNames))
	for p, name := range pathNames {
		out.Paths[name] = e.pathCalls[p].Load()
	}
	if why := e.mappedOffWhy.reason.Load(); why != nil {
		out.MappedOff = *why
	}
	if t := e.ft.Timed; t != nil {
		for name, ns := range t.PhaseNs() {
			out.PhaseNs["backend_"+name] = ns
		}
	}
	e.tokensMu.Lock()
	tokens := append([]float64(nil), e.expertTokens...)
	e.tokensMu.Unlock()
	for l, c := range cs {
		ls := LayerStats{LayerStats: c, BytesMoved: e.bytesMoved[l].Load(), StallNs: e.stallNs[l].Load(),
			CPUComputed: e.cpuComputed[l].Load(), CPUNs: e.cpuNs[l].Load(), MissPlanNs: e.missPlanNs[l].Load()}
		ls.ExpertTokens = tokens[l*e.experts : (l+1)*e.experts : (l+1)*e.experts]
		out.Layers[l] = ls
		out.LayerStats.Add(c)
		out.BytesMoved += ls.BytesMoved
		out.StallNs += ls.StallNs
		out.CPUComputed += ls.CPUComputed
		out.CPUNs += ls.CPUNs
		out.MissPlanNs += ls.MissPlanNs
	}
	return out, nil
}

// ResetStats zeroes every counter (the cache contents stay).
func (e *Engine) ResetStats() error {
	if err := e.readyLocked(); err != nil {
		return err
	}
	e.drainMapped() // launches before the reset are counted before it
	e.cache.ResetStats()
	for l := range e.bytesMoved {
		e.bytesMoved[l].Store(0)
		e.stallNs[l].Store(0)
		e.cpuComputed[l].Store(0)
		e.cpuNs[l].Store(0)
		e.missPlanNs[l].Store(0)
	}
	e.tokensMu.Lock()
	clear(e.expertTokens)
	e.tokensMu.Unlock()
	e.acquires.Store(0)
	e.mapped.late.Store(0)
	for p := range e.phaseNs {
		e.phaseNs[p].Store(0)
	}
	for p := range e.pathCalls {
		e.pathCalls[p].Store(0)
	}
	if t := e.ft.Timed; t != nil {
		t.ResetPhases()
	}
	return nil
}
