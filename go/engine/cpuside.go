package engine

import (
	"fmt"
	"sort"
	"sync"
	"time"
	"unsafe"

	"github.com/moe-infinity/moe_infinity/go/backend"
	"github.com/moe-infinity/moe_infinity/go/cache"
	"github.com/moe-infinity/moe_infinity/go/dtype"
	"github.com/moe-infinity/moe_infinity/go/prefetch"
)

// The CPU side of hybrid execution (see ChooseMisses): the experts of a
// layer call that the cost model sends to the CPU are computed with the
// SIMD expert FFN (package cpuffn) from host memory, without taking a
// slot: they are counted as cache misses (cache.Touch) but never admitted,
// so they evict nothing.
//
// Built for the CPU backend, which stands in for a device so that the CPU
// test suite exercises every decision: there the "device" is the CPU too,
// and the layer runs as one cpuffn call whose slot experts are read from
// their slots and whose CPU experts from host memory, so that the output
// is the kernels' path's within its rounding (one sum per token, rounded
// once). A GPU backend's CPU side (activations to the host, the partial
// output back inside copy mode's handshake) is not built yet: there
// Plan.Executor.HybridOff says so.
//
// Where an expert is read: cpuffn reads without a guard, and a checkpoint
// file truncated under its mapping faults (SIGBUS) in C, which no guard
// can catch. So an expert whose bytes are host tensors (memory the caller
// owns, which cannot fault) is read in place; one in a mapped file is
// first copied, under the checkpoint's guard, into a staging buffer that
// is not a cache slot (cpuStageBytes bound them, MissInputs.MaxCPU).

// cpuKernel is the CPU side's FFN (package cpuffn through cgo; nil
// without cgo).
type cpuKernel interface {
	// run computes p.
	run(p cpuProblem) error
	// measure fills the CPU's figures of the cost model (CPUGBps,
	// CPUTokenCost) and the CPU backend's copy rate and contention
	// (LinkGBps, LinkShare, CPUShare) for experts of hidden × inter.
	measure(hidden, inter int64, f16 bool) (HybridCosts, error)
	// close frees the kernel's memory.
	close()
}

// cpuProblem is cpuffn.Problem (see there).
type cpuProblem struct {
	T, K, Hidden, Inter int64
	F16                 bool
	X, Out, Scratch     uint64
	Weights             []float32
	Gate, Up, Down      []uint64
}

// cpuStageBytes bounds the staging buffers of experts the CPU computes
// from mapped files, in bytes (at least one expert fits).
const cpuStageBytes = 1 << 30

// hybridState is the engine's CPU side.
type hybridState struct {
	k     cpuKernel   // nil: hybrid execution is off
	costs HybridCosts // the cost model the choices rest on
	mu    sync.Mutex  // guards stage (held while a call stages and runs)
	stage [][]byte    // staging buffers, one per staged expert of a call
}

// setupHybrid turns hybrid execution on when the model's experts run on
// the kernels, cpu_experts gives the CPU threads and the backend is the
// CPU backend; it fills the plan's Hybrid, HybridOff and HybridCosts.
// Called by configure, with e.plan.Executor planned.
func (e *Engine) setupHybrid(p *ExecutorPlan) error {
	threads := e.cfg.CPUExperts.Threads(e.cfg.Backend)
	switch {
	case e.cfg.CPUExperts == CPUExpertsOff:
		p.HybridOff = "cpu_experts is off"
		return nil
	case threads == 0:
		p.HybridOff = `cpu_experts "auto" is off on the CPU backend (a thread count turns it on)`
		return nil
	case !p.Kernels:
		p.HybridOff = "the expert kernels do not serve this model: " + p.KernelsOff
		return nil
	case p.Quant != "":
		p.HybridOff = fmt.Sprintf("the CPU hand-off computes bfloat16/float16 experts; these are quantized (%s)", p.Quant)
		return nil
	case e.be.Name() != "cpu":
		p.HybridOff = fmt.Sprintf("the %s backend's CPU hand-off is not built yet", e.be.Name())
		return nil
	}
	k := newCPUKernel(threads)
	if k == nil {
		p.HybridOff = "the engine was built without cgo (no SIMD expert FFN)"
		return nil
	}
	measure := e.MeasureHybrid
	if measure == nil {
		measure = k.measure
	}
	c, err := measure(p.Hidden, p.Inter, p.DType == 1)
	if err != nil {
		k.close()
		return err
	}
	if r := e.rates; r != nil { // given or measured on the device: they describe its link
		c.LinkGBps, c.ReadGBps, c.LinkFixedUs = r.DMAGBps, r.ZeroCopyGBps, r.ReactionUs
	}
	if !c.usable() {
		k.close()
		p.HybridOff = fmt.Sprintf("the cost model cannot compare the CPU with the link: %+v", c)
		return nil
	}
	e.hybrid.k, e.hybrid.costs = k, c
	p.Hybrid, p.HybridCosts = true, &c
	return nil
}

// chooseCPU returns the experts of the call (c.Experts, distinct) that
// ChooseMisses sends to the CPU, ascending; nil when hybrid execution is
// off or none is. The misses are the experts neither in a slot nor being
// loaded into one (cache.Lookup: one that changes state before Acquire is
// served as Acquire finds it).
func (e *Engine) chooseCPU(c FFNCall, reqs []uint64, topk []int64) []int32 {
	if e.hybrid.k == nil || topk == nil {
		return nil
	}
	tokens := make(map[int32]int64, len(c.Experts))
	for _, x := range topk {
		tokens[int32(x)]++
	}
	var misses []Miss
	for _, x := range c.Experts {
		if _, st := e.cache.Lookup(cache.Key{Layer: int32(c.Layer), Expert: x}); st == cache.Empty {
			misses = append(misses, Miss{Expert: x, Tokens: tokens[x]})
		}
	}
	if len(misses) == 0 {
		return nil
	}
	if reuse := e.predictReuse(c.Layer, reqs, c.K); reuse != nil {
		for i := range misses {
			misses[i].Reuse = reuse[misses[i].Expert]
		}
	}
	maxCPU := 0
	if len(e.files[c.Layer]) > 0 {
		maxCPU = int(max(1, cpuStageBytes/e.lay.SlotBytes))
	}
	plan := ChooseMisses(MissInputs{
		Costs: e.hybrid.costs, ExpertBytes: e.lay.SourceBytes, Misses: misses,
		CPU: true, MaxCPU: maxCPU, HotShare: e.hotShare(),
	})
	var out []int32
	for i, w := range plan.Ways {
		if w == MissCPU {
			out = append(out, misses[i].Expert)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

// hotShare is MissInputs.HotShare: the bar the prefetch planner sets for
// an expert worth loading ahead (its MinTokenShare, or the default when
// that filter is off) is the bar for one worth a slot.
func (e *Engine) hotShare() float64 {
	if s := e.planner.MinTokenShare; s > 0 {
		return s
	}
	return prefetch.DefaultMinTokenShare
}

// predictReuse is the EAMC's prediction of layer's routing for the
// requests' coming tokens, per expert: the share of the layer's tokens
// predicted to use it (share of the matched EAMs' row × k), the largest
// over reqs. Layer 0 matches a request's whole EAM (its earlier tokens),
// a later layer its rows before this one, as the planner does. Rows whose
// matched EAMs hold fewer tokens than the planner's MinEvidence predict
// nothing. nil when nothing is predicted.
func (e *Engine) predictReuse(layer int, reqs []uint64, k int64) []float64 {
	var out []float64
	for _, r := range reqs {
		var raw interface{ Row(int) []float32 }
		if layer == 0 {
			m, err := e.tracker.PredictRawAll(r, max(1, e.planner.Matches))
			if err != nil || m == nil {
				continue
			}
			raw = m
		} else {
			m, err := e.tracker.PredictRaw(r, layer-1, max(1, e.planner.Matches))
			if err != nil || m == nil {
				continue
			}
			raw = m
		}
		row := raw.Row(layer)
		var total float64
		for _, v := range row {
			total += float64(v)
		}
		if total <= 0 || total < e.planner.MinEvidence {
			continue
		}
		if out == nil {
			out = make([]float64, len(row))
		}
		for x, v := range row {
			out[x] = max(out[x], float64(v)/total*float64(k))
		}
	}
	return out
}

// layerHybrid computes a layer whose experts cpuX (ascending, a subset of
// c.Experts) the CPU computes from host memory: the others are acquired
// into slots as usual, and one cpuffn call computes every pair, reading
// each expert from its slot or from host memory. cpuX are counted as
// misses but not admitted.
func (e *Engine) layerHybrid(c FFNCall, cpuX []int32, topk []int64) error {
	hidden, inter, code, err := e.FFNShape()
	if err != nil {
		return err
	}
	if c.DType != code {
		return fmt.Errorf("%w: activations have dtype code %d but the experts have %d", ErrInvalid, c.DType, code)
	}
	if c.WDType < backend.WeightsF32 || c.WDType > backend.WeightsF16 {
		return fmt.Errorf("%w: routing-weight type %d (0 = float32, 1 = bfloat16, 2 = float16)", ErrInvalid, c.WDType)
	}
	if err := e.checkLayer(c.Layer); err != nil {
		return err
	}
	gu, _ := e.lay.Region("gate_up_proj")
	dn, _ := e.lay.Region("down_proj")
	half := uint64(inter * hidden * 2) // the gate rows' bytes; the up rows follow
	rows := make(map[int32][3]uint64, len(c.Experts))
	onCPU := make(map[int32]bool, len(cpuX))
	for _, x := range cpuX {
		onCPU[x] = true
	}
	var dev []int32
	for _, x := range c.Experts {
		if !onCPU[x] {
			dev = append(dev, x)
		}
	}
	if len(dev) > 0 {
		slots := make([]int32, len(dev))
		t0 := time.Now()
		lease, err := e.Acquire(c.Layer, dev, slots, c.Stream)
		if err != nil {
			return err
		}
		e.phase(phaseAcquire, t0)
		defer func() {
			t0 := time.Now()
			_ = e.Release(lease, c.Stream) // the CPU backend's Release fails only for an unknown lease
			e.phase(phaseRelease, t0)
		}()
		for i, s := range slots {
			b := uint64(e.be.SlotAddr(int(s)))
			rows[dev[i]] = [3]uint64{b + uint64(gu.Offset), b + uint64(gu.Offset) + half, b + uint64(dn.Offset)}
		}
	}

	h := &e.hybrid
	h.mu.Lock()
	defer h.mu.Unlock()
	t0 := time.Now()
	keys := make([]cache.Key, len(cpuX))
	for i, x := range cpuX {
		keys[i] = cache.Key{Layer: int32(c.Layer), Expert: x}
		r, err := e.hostRows(c.Layer, x, i, gu.Offset, dn.Offset, half)
		if err != nil {
			return fmt.Errorf("expert L%d/E%d for the CPU: %w", c.Layer, x, err)
		}
		rows[x] = r
	}
	e.cache.Touch(keys, make([]bool, len(keys)))
	P := c.T * c.K
	p := cpuProblem{
		T: c.T, K: c.K, Hidden: hidden, Inter: inter, F16: code == 1, X: c.X, Out: c.Out, Scratch: c.Scratch,
		Weights: weightsF32(c.Weights, c.WDType, P), Gate: make([]uint64, P), Up: make([]uint64, P), Down: make([]uint64, P),
	}
	for i, x := range topk {
		r := rows[int32(x)] // every routed expert is in c.Experts (routingCounts)
		p.Gate[i], p.Up[i], p.Down[i] = r[0], r[1], r[2]
	}
	staged := time.Since(t0)
	t1 := time.Now()
	err = h.k.run(p)
	ran := time.Since(t1)
	e.phase(phaseKernels, t1)
	if err != nil {
		return fmt.Errorf("expert FFN of layer %d: %w", c.Layer, err)
	}
	// The CPU's time for its experts: staging, and their share of the one
	// call that computed the layer (each expert's weights are read once).
	ns := staged + ran*time.Duration(len(cpuX))/time.Duration(len(c.Experts))
	e.cpuComputed[c.Layer].Add(int64(len(cpuX)))
	e.cpuNs[c.Layer].Add(int64(ns))
	return nil
}

// hostRows are expert (layer, x)'s gate, up and down rows in host memory
// that cannot fault: its host tensors in place, or a copy in staging
// buffer i made under the checkpoint's guard (with the layout's
// conversion, if any). Holds e.hybrid.mu.
func (e *Engine) hostRows(layer int, x int32, i int, guOff, dnOff int64, half uint64) ([3]uint64, error) {
	if len(e.files[layer]) == 0 {
		if segs, ok := e.lay.Segments(e.mods[layer], int(x)); ok {
			ml := backend.MappedLayout{Gate: guOff, Up: guOff + int64(half), Down: dnOff, RowsBytes: int64(half), DownBytes: int64(half)}
			if r, ok := backend.ResolveHostRows(ml, segs); ok {
				return [3]uint64{uint64(r[0]), uint64(r[1]), uint64(r[2])}, nil
			}
		}
	}
	h := &e.hybrid
	for len(h.stage) <= i {
		h.stage = append(h.stage, make([]byte, e.lay.SlotBytes))
	}
	buf := h.stage[i]
	src := source{lay: e.lay, mods: e.mods, ckpt: e.ckpt, files: e.files}
	if err := src.Fill(layer, int(x), buf); err != nil {
		return [3]uint64{}, err
	}
	b := uint64(uintptr(unsafe.Pointer(&buf[0])))
	return [3]uint64{b + uint64(guOff), b + uint64(guOff) + half, b + uint64(dnOff)}, nil
}

// weightsF32 reads the P routing weights at addr (of wdt) as float32.
func weightsF32(addr uint64, wdt int64, P int64) []float32 {
	out := make([]float32, P)
	ptr := *(*unsafe.Pointer)(unsafe.Pointer(&addr))
	dst := unsafe.Slice((*byte)(unsafe.Pointer(&out[0])), 4*P)
	switch wdt {
	case backend.WeightsBF16:
		_ = dtype.Convert(dst, dtype.F32, unsafe.Slice((*byte)(ptr), 2*P), dtype.BF16)
	case backend.WeightsF16:
		_ = dtype.Convert(dst, dtype.F32, unsafe.Slice((*byte)(ptr), 2*P), dtype.F16)
	default:
		copy(out, unsafe.Slice((*float32)(ptr), P))
	}
	return out
}
