package engine

import (
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
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
// slot: they are counted as cache misses and then offered to the cache
// like mapped mode's in-place reads (useOnCPU): one the eviction policy
// ranks above its victim is copied in behind the call, off its path.
//
// One layer call is backend-neutral (layerHybrid), through the backend's
// hand-off (backend.HandOff): the layer's activations and routing weights
// are handed to the host, the CPU computes its experts' part of the output
// as float32 partial sums (cpuffn's PartialOut) while the other experts
// come over the link into slots, the partial is handed back, and the
// backend's kernels compute the slot experts (the CPU's experts are null
// in their tables, so their pairs are skipped) and add the partial
// (FFNArgs.Addend) before the one rounding per token. The CPU backend's
// hand-off copies nothing (its memory is the host's), so the CPU test
// suite runs the same sequence the CUDA backend runs, with the reference
// and SIMD kernels as the oracle of the CUDA ones. The CUDA hand-off is
// eager (it waits on the host once per layer), so CUDA-graph replays have
// a hand-off of their own, in copy mode (graphhandoff.go). Prefill-sized
// calls, which the caller's own code computes (the host paths), share it
// too (hostPartial): the partial is handed back into the caller's buffer,
// and the caller's code skips the CPU's experts and adds it.
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
	// setThreads sets the threads later calls run on.
	setThreads(n int)
}

// cpuProblem is cpuffn.Problem (see there).
type cpuProblem struct {
	T, K, Hidden, Inter         int64
	F16                         bool
	X, Out, Scratch, PartialOut uint64
	Weights                     []float32
	Gate, Up, Down              []uint64
}

// cpuStageBytes bounds the staging buffers of experts the CPU computes
// from mapped files, in bytes (at least one expert fits).
const cpuStageBytes = 1 << 30

// hybridState is the engine's CPU side.
type hybridState struct {
	k       cpuKernel                   // nil: hybrid execution is off
	costs   atomic.Pointer[HybridCosts] // the cost model the choices rest on (Tune may replace it)
	paused  atomic.Bool                 // Tuning.CPUExperts "off": k stays, the CPU computes no expert
	cal     CPUCalibration              // what the CPU's experts took against costs, in use
	mu      sync.Mutex                  // guards stage and scratch, and serialises hand-offs (held for a whole call)
	stage   [][]byte                    // staging buffers, one per staged expert of a call
	scratch []float32                   // the CPU's SwiGLU intermediate, [P, Inter]
	gx      []byte                      // the activations of the tokens with a pair on the CPU (cpuPart)
	gpart   []float32                   // their partial output
}

// setupHybrid turns hybrid execution on when the model's experts run on
// the kernels, cpu_experts gives the CPU threads, the backend can hand a
// layer to the CPU (backend.HandOff) and, on a device backend, the link's
// rates are known (given or measured): the cost model weighs the CPU
// against them. It fills the plan's Hybrid, HybridOff and HybridCosts.
// Called by configure, with e.plan.Executor planned and e.rates set.
func (e *Engine) setupHybrid(p *ExecutorPlan) error {
	threads := e.cfg.CPUExperts.Threads(e.cfg.Backend)
	name := e.be.Name()
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
	case e.ffn == "gpt_oss":
		p.HybridOff = "the CPU hand-off computes standard SwiGLU experts, not gpt-oss ones"
		return nil
	case e.ft.HandOff == nil:
		p.HybridOff = fmt.Sprintf("the %s backend cannot hand a layer to the CPU", name)
		return nil
	case name != "cpu" && e.rates == nil:
		// The CPU backend's "link" is its copy workers, whose rate the
		// CPU kernel's measure takes; a device's link is known only from
		// its rates.
		p.HybridOff = fmt.Sprintf("the %s backend's link rates are unknown (not given in link_rates, and measure_link is off or its measurement failed): the cost model cannot weigh the CPU against the link", name)
		return nil
	}
	k := newCPUKernel(threads)
	if k == nil {
		p.HybridOff = "the engine was built without cgo (no SIMD expert FFN)"
		return nil
	}
	c, err := e.measureHybrid(k, p)
	if err != nil {
		k.close()
		return err
	}
	if !c.usable() {
		k.close()
		p.HybridOff = fmt.Sprintf("the cost model cannot compare the CPU with the link: %+v", c)
		return nil
	}
	e.hybrid.k = k
	e.hybrid.costs.Store(&c)
	p.Hybrid, p.HybridCosts, p.CPUThreads = true, &c, threads
	return nil
}

// measureHybrid is the cost model for kernel k on plan p's experts: the
// CPU's figures measured (MeasureHybrid when a test injects one), the
// link's from the device's rates where they are known.
func (e *Engine) measureHybrid(k cpuKernel, p *ExecutorPlan) (HybridCosts, error) {
	measure := e.MeasureHybrid
	if measure == nil {
		measure = k.measure
	}
	c, err := measure(p.Hidden, p.Inter, p.DType == dtype.F16)
	if err != nil {
		return HybridCosts{}, err
	}
	if r := e.rates; r != nil { // given or measured on the device: they describe its link
		c.LinkGBps, c.ReadGBps, c.LinkFixedUs = r.DMAGBps, r.ZeroCopyGBps, r.ReactionUs
		c.HandOffFixedUs = e.ft.HandOff.HandOffFixedUs(backend.LinkRates(*r))
	}
	return c, nil
}

// setHybridThreads gives the CPU side threads threads (Tuning.CPUExperts
// as a count): its figures are measured again on them (the link's stay),
// the calibration starts over, hybrid execution resumes, and the plan
// says so. Fails, changing nothing, where configure set no CPU side up or
// the new figures cannot be compared with the link.
func (e *Engine) setHybridThreads(threads int) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	p := &e.plan.Executor
	h := &e.hybrid
	if h.k == nil {
		return fmt.Errorf("%w: cpu_experts %d: hybrid execution was not set up at configure: %s", ErrInvalid, threads, p.HybridOff)
	}
	h.mu.Lock() // no hand-off is computing
	defer h.mu.Unlock()
	was := p.CPUThreads
	h.k.setThreads(threads)
	c, err := e.measureHybrid(h.k, p)
	if err == nil && !c.usable() {
		err = fmt.Errorf("%w: cpu_experts %d: the cost model cannot compare the CPU with the link: %+v", ErrInvalid, threads, c)
	}
	if err != nil {
		h.k.setThreads(was)
		return err
	}
	h.costs.Store(&c)
	h.cal.Reset()
	p.HybridCosts, p.CPUThreads = &c, threads
	e.setPausedLocked(false)
	return nil
}

// hybridOn says whether the CPU computes experts now: configure set
// hybrid execution up and no Tune paused it.
func (e *Engine) hybridOn() bool {
	return e.hybrid.k != nil && !e.hybrid.paused.Load()
}

// pauseHybrid pauses (off) or resumes hybrid execution (Tuning.CPUExperts)
// and states it in the plan: a paused engine's plan says hybrid false,
// with the reason. Resuming one whose configure set none up fails with
// the plan's reason.
func (e *Engine) pauseHybrid(off bool) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	p := &e.plan.Executor
	if e.hybrid.k == nil {
		if off {
			return nil
		}
		return fmt.Errorf("%w: cpu_experts \"auto\": hybrid execution was not set up at configure: %s", ErrInvalid, p.HybridOff)
	}
	e.setPausedLocked(off)
	return nil
}

// setPausedLocked pauses (off) or resumes the CPU side, set up at
// configure, and states it in the plan, the graph hand-off following
// hybrid execution as at configure. Holds e.mu.
func (e *Engine) setPausedLocked(off bool) {
	p := &e.plan.Executor
	e.hybrid.paused.Store(off)
	p.Hybrid, p.HybridOff = !off, ""
	if off {
		p.HybridOff = "paused by tune (cpu_experts \"off\")"
	}
	e.planGraphHandOff(p)
}

// cpuPick is the experts of a layer call that ChooseMisses sends to the
// CPU (distinct, ascending) and when it expects the CPU to be done with
// them (CPUFinish under the calibrated costs), in seconds.
type cpuPick struct {
	experts []int32
	expectS float64
}

// tuneCPUExperts applies Tuning.CPUExperts c: "off" pauses hybrid
// execution; "auto" or a count resumes it, on that many threads
// (setHybridThreads) where they differ from the CPU side's now.
func (e *Engine) tuneCPUExperts(c CPUExperts) error {
	if err := c.check(); err != nil {
		return err
	}
	if c == CPUExpertsOff {
		return e.pauseHybrid(true)
	}
	threads := c.Threads(e.cfg.Backend)
	e.mu.Lock()
	now := e.plan.Executor.CPUThreads
	e.mu.Unlock()
	if threads == 0 || threads == now {
		return e.pauseHybrid(false)
	}
	return e.setHybridThreads(threads)
}

// chooseCPU returns the experts of the call (c.Experts, distinct) that
// ChooseMisses sends to the CPU; none when hybrid execution is
// off, a graph is being captured, or none is. The misses are the experts neither in a slot nor being
// loaded into one (cache.Lookup: one that changes state before Acquire is
// served as Acquire finds it).
func (e *Engine) chooseCPU(c FFNCall, reqs []uint64, topk []int64) cpuPick {
	if !e.hybridOn() || topk == nil {
		return cpuPick{}
	}
	e.mapped.mu.Lock()
	capturing := e.mapped.capturing
	e.mapped.mu.Unlock()
	if capturing { // the hand-off waits on the host: never inside a capture
		return cpuPick{}
	}
	return e.cpuMisses(c.Layer, c.Experts, c.K, reqs, topk)
}

// cpuMisses returns the experts of layer (experts, distinct) that
// ChooseMisses sends to the CPU, for a call of routing topk (K experts a
// token) for reqs; none when none is. The cost model's CPU side is
// scaled by what the CPU's experts took so far (hybridState.cal).
func (e *Engine) cpuMisses(layer int, experts []int32, K int64, reqs []uint64, topk []int64) cpuPick {
	tokens := make(map[int32]int64, len(experts))
	for _, x := range topk {
		tokens[int32(x)]++
	}
	var misses []Miss
	for _, x := range experts {
		if _, st := e.cache.Lookup(cache.Key{Layer: int32(layer), Expert: x}); st == cache.Empty {
			misses = append(misses, Miss{Expert: x, Tokens: tokens[x]})
		}
	}
	if len(misses) == 0 {
		return cpuPick{}
	}
	if reuse := e.predictReuse(layer, reqs, K); reuse != nil {
		for i := range misses {
			misses[i].Reuse = reuse[misses[i].Expert]
		}
	}
	maxCPU := 0
	if len(e.files[layer]) > 0 {
		maxCPU = int(max(1, cpuStageBytes/e.lay.SlotBytes))
	}
	costs := e.hybrid.costs.Load().ScaleCPU(e.hybrid.cal.Scale())
	plan := ChooseMisses(MissInputs{
		Costs: costs, ExpertBytes: e.lay.SourceBytes, Misses: misses,
		CPU: true, MaxCPU: maxCPU, HotShare: e.hotShare(),
	})
	e.missPlanNs[layer].Add(int64(plan.FinishS * 1e9))
	var out []int32
	for i, w := range plan.Ways {
		if w == MissCPU {
			out = append(out, misses[i].Expert)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return cpuPick{out, CPUFinish(plan.LinkS, plan.CPUS, costs)}
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

// layerHybrid computes a layer whose experts pick (a subset of
// c.Experts) the CPU computes from host memory while the others are
// acquired into slots as usual (see the top of this file): the backend
// hands the layer out, the CPU computes its pairs' partial output while
// Acquire brings the device's experts, and the kernels compute the rest
// and add the partial. cpuX are counted as misses and offered to the
// cache (useOnCPU).
func (e *Engine) layerHybrid(c FFNCall, pick cpuPick, topk []int64) error {
	cpuX := pick.experts
	kern := e.ft.Kernels
	if kern == nil {
		return fmt.Errorf("%w: backend %s has no expert FFN kernels", ErrUnsupported, e.be.Name())
	}
	dev := withoutExperts(c.Experts, cpuX)
	h := &e.hybrid
	h.mu.Lock()
	defer h.mu.Unlock()
	// The hand-off first: on a GPU the activations' copy is queued on the
	// stream before Acquire makes it wait for the device experts' copies.
	ho, work, shape, err := e.handOut(c)
	if err != nil {
		return err
	}
	done := make(chan cpuDone, 1)
	go func() {
		t0 := time.Now()
		err := e.cpuPart(c, cpuX, topk, work, shape.hidden, shape.inter)
		done <- cpuDone{time.Since(t0), err}
	}()

	var slots []int32
	if len(dev) > 0 {
		slots = make([]int32, len(dev))
		t0 := time.Now()
		lease, err := e.acquire(c.Layer, dev, slots, c.Stream, false)
		if err != nil {
			<-done // it reads the hand-off's buffers and the staging buffers
			return err
		}
		e.phase(phaseAcquire, t0)
		defer func() {
			t0 := time.Now()
			_ = e.Release(lease, c.Stream) // fails only for an unknown lease or a closed engine
			e.phase(phaseRelease, t0)
		}()
	}
	e.useOnCPU(c.Layer, cpuX)
	t1 := time.Now()
	r := <-done
	t1 = e.phase(phaseCPUWait, t1)
	if r.err != nil {
		return fmt.Errorf("expert FFN of layer %d on the CPU: %w", c.Layer, r.err)
	}
	addend, err := ho.HandBack(c.Stream, 0)
	if err != nil {
		return fmt.Errorf("expert FFN of layer %d: %w", c.Layer, err)
	}
	t1 = e.phase(phaseHandBack, t1)
	args := e.kernelArgs(c, shape.hidden, shape.inter, shape.dt, dev, slots)
	args.Addend = addend
	ffnErr := kern.FFN(args)
	if err := ho.HandDone(c.Stream); err != nil && ffnErr == nil {
		ffnErr = err
	}
	e.phase(phaseKernels, t1)
	if ffnErr != nil {
		return fmt.Errorf("expert FFN of layer %d: %w", c.Layer, ffnErr)
	}
	e.countCPU(c.Layer, pick, shape.handed+r.ns)
	return nil
}

// hostPartial is hybrid execution on the host paths (prefill-sized
// calls, which the caller's own expert code computes on slot views): the
// CPU computes the pairs of call c routed to pick's experts (a subset of
// c.Experts) into partial, the caller's float32 [T, Hidden] buffer
// (kernel memory, like c.X), and the caller's code computes the others
// (dev) and adds it. The hand-off brings the activations and routing
// weights to the host; while the CPU computes, dev are hinted to the
// prefetcher, so the link brings them meanwhile (where prefetching is
// on); HandBack fills partial in stream order. cpuX are counted as misses
// (cpu_computed, cpu_ns) and offered to the cache (useOnCPU): the
// prompt's experts the CPU computed can still be there for decode.
func (e *Engine) hostPartial(c FFNCall, pick cpuPick, dev []int32, topk []int64, partial uint64) error {
	cpuX := pick.experts
	h := &e.hybrid
	h.mu.Lock()
	defer h.mu.Unlock()
	ho, work, shape, err := e.handOut(c)
	if err != nil {
		return err
	}
	if len(dev) > 0 {
		e.core.Hint(c.Layer, dev)
	}
	t0 := time.Now()
	if err := e.cpuPart(c, cpuX, topk, work, shape.hidden, shape.inter); err != nil {
		return fmt.Errorf("expert FFN of layer %d on the CPU: %w", c.Layer, err)
	}
	t1 := e.phase(phaseCPUWait, t0) // synchronous: all of it is waited for
	ns := t1.Sub(t0)
	if _, err := ho.HandBack(c.Stream, partial); err != nil {
		return fmt.Errorf("expert FFN of layer %d: %w", c.Layer, err)
	}
	if err := ho.HandDone(c.Stream); err != nil {
		return fmt.Errorf("expert FFN of layer %d: %w", c.Layer, err)
	}
	e.phase(phaseHandBack, t1)
	e.useOnCPU(c.Layer, cpuX)
	e.countCPU(c.Layer, pick, shape.handed+ns)
	return nil
}

// handShape is a hand-off's FFN shape and the time HandOut took.
type handShape struct {
	hidden, inter int64
	dt            dtype.DType
	handed        time.Duration
}

// handOut checks call c for the CPU side (activations of the experts'
// type, routing weights the hand-off reads, the layer's checkpoint
// unchanged) and hands its activations and routing weights out
// (backend.HandOff.HandOut), with room for a float32 [T, Hidden] partial
// output. Holds e.hybrid.mu.
func (e *Engine) handOut(c FFNCall) (backend.HandOff, backend.HostWork, handShape, error) {
	var sh handShape
	hidden, inter, dt, err := e.FFNShape()
	if err != nil {
		return nil, backend.HostWork{}, sh, err
	}
	ho := e.ft.HandOff
	if ho == nil {
		return nil, backend.HostWork{}, sh, fmt.Errorf("%w: backend %s has no CPU hand-off", ErrUnsupported, e.be.Name())
	}
	if err := checkActivations(c, dt); err != nil {
		return nil, backend.HostWork{}, sh, err
	}
	if !backend.IsRoutingWeightsDType(c.WDType) {
		return nil, backend.HostWork{}, sh, fmt.Errorf("%w: routing weights are %s; the kernels take float32, bfloat16 or float16", ErrInvalid, c.WDType.TorchName())
	}
	if err := e.checkLayer(c.Layer); err != nil {
		return nil, backend.HostWork{}, sh, err
	}
	t0 := time.Now()
	P := c.T * c.K
	work, err := ho.HandOut(c.Stream, c.X, c.T*hidden*2, c.Weights, P*int64(c.WDType.Size()), c.T*hidden*4)
	if err != nil {
		return nil, backend.HostWork{}, sh, fmt.Errorf("expert FFN of layer %d: %w", c.Layer, err)
	}
	handed := time.Since(t0)
	e.phaseNs[phaseHandOut].Add(int64(handed))
	return ho, work, handShape{hidden, inter, dt, handed}, nil
}

// useOnCPU counts the experts the CPU computed as misses of layer and
// offers each to the cache as an expert used where it lies, as mapped
// mode offers its in-place reads (core.UseInPlace with the admission
// margin): one the eviction policy ranks above its victim is copied into
// that slot in the background, at the prefetches' priority (admit), and
// the call that computed it does not wait. The CPU decides where an
// expert runs now; the cache decides, by its one rule, whether it stays.
// Never admitting them froze the cache wherever the CPU took most misses.
//
// Only as many are admitted as may wait for the prefetch window
// (admitRoom): an admitted expert is reserved (loading) until its copy
// completes, and a later call that needs it waits for that copy. With no
// bound, a policy that admits every miss (LRU) queued the CPU's experts
// faster than the link carried them, and calls waited on the backlog
// (with a modelled 0.3 GB/s link, 16 clients under LRU served 2.2× slower
// with the CPU's part on than off).
func (e *Engine) useOnCPU(layer int, cpuX []int32) {
	keys := make([]cache.Key, len(cpuX))
	for i, x := range cpuX {
		keys[i] = cache.Key{Layer: int32(layer), Expert: x}
	}
	grants := e.core.UseInPlace(keys, make([]bool, len(keys)), *e.cfg.AdmitMargin, e.admitRoom())
	if len(grants) == 0 {
		return
	}
	e.admitWaiting.Add(int64(len(grants)))
	e.bg.Add(1)
	go func() {
		defer e.bg.Done()
		for _, g := range grants {
			e.admit(g)
			e.admitWaiting.Add(-1)
		}
	}()
}

// admitRoom is how many more of the CPU's experts may be admitted now:
// admitBacklog prefetch windows' worth may wait for a place in the window
// (a heuristic bound: concurrent calls may both take the same room).
func (e *Engine) admitRoom() int {
	return max(0, admitBacklog*cap(e.prefSem)-int(e.admitWaiting.Load()))
}

// admitBacklog bounds the CPU's experts admitted but not yet copying, in
// prefetch windows. Measured on the CPU backend with a modelled link
// (BENCHMARKS.md, "A modelled link on the CPU, and the CPU's admissions
// bounded"): unbounded, 16 serving clients under LRU ran 5–6× slower than
// with this bound; with the most valued offered first (core.UseInPlace) it
// costs batch-1 decode 1–3 points of hit rate against unbounded (a bound
// of 1 window, in pick order, cost 6–14).
const admitBacklog = 4

// countCPU adds the CPU's experts of a layer call and its time for them
// (the hand-off, staging and its FFN) to cpu_computed and cpu_ns, and
// the time against the cost model's expectation to the calibration.
func (e *Engine) countCPU(layer int, pick cpuPick, took time.Duration) {
	e.cpuComputed[layer].Add(int64(len(pick.experts)))
	e.cpuNs[layer].Add(int64(took))
	e.hybrid.cal.Observe(pick.expectS, took.Seconds())
}

// cpuDone is the CPU part's host time and error.
type cpuDone struct {
	ns  time.Duration
	err error
}

// cpuPart computes the pairs of call c routed to cpuX (topk, on the host)
// on the CPU: from the activations and routing weights the hand-off
// brought (w), into its partial output (float32 [T, Hidden]; zero rows
// for tokens without such a pair). When only some tokens have a pair on
// the CPU (a prefill-sized call gives it the experts of few tokens) the
// problem is gathered to those tokens, so that its scratch is [their
// pairs, Inter] rather than the call's, and their rows are scattered
// back. Holds e.hybrid.mu.
func (e *Engine) cpuPart(c FFNCall, cpuX []int32, topk []int64, w backend.HostWork, hidden, inter int64) error {
	gu, _ := e.lay.Region("gate_up_proj")
	dn, _ := e.lay.Region("down_proj")
	half := uint64(inter * hidden * 2) // the gate rows' bytes; the up rows follow
	rows := make(map[int32][3]uint64, len(cpuX))
	for i, x := range cpuX {
		r, err := e.hostRows(c.Layer, x, i, gu.Offset, dn.Offset, half)
		if err != nil {
			return fmt.Errorf("expert L%d/E%d: %w", c.Layer, x, err)
		}
		rows[x] = r
	}
	onCPU := func(x int64) ([3]uint64, bool) {
		r, ok := rows[int32(x)]
		return r, ok && x >= 0 && x < int64(e.experts) // the device's pairs stay null
	}
	var toks []int64 // the tokens with a pair on the CPU
	for t := int64(0); t < c.T; t++ {
		for j := int64(0); j < c.K; j++ {
			if _, ok := onCPU(topk[t*c.K+j]); ok {
				toks = append(toks, t)
				break
			}
		}
	}
	h := &e.hybrid
	T, K := int64(len(toks)), c.K
	P := T * K
	if int64(len(h.scratch)) < max(P, 1)*inter {
		h.scratch = make([]float32, max(P, 1)*inter)
	}
	xb := hidden * 2 // one token's activations, in bytes
	x, out := w.X, w.Partial
	gather := T < c.T
	if gather {
		if int64(len(h.gx)) < max(T, 1)*xb {
			h.gx = make([]byte, max(T, 1)*xb)
		}
		if int64(len(h.gpart)) < max(T, 1)*hidden {
			h.gpart = make([]float32, max(T, 1)*hidden)
		}
		src := unsafe.Slice((*byte)(backend.HostPtr(w.X)), c.T*xb)
		for i, t := range toks {
			copy(h.gx[int64(i)*xb:int64(i+1)*xb], src[t*xb:(t+1)*xb])
		}
		x, out = uint64(uintptr(unsafe.Pointer(&h.gx[0]))), uint64(uintptr(unsafe.Pointer(&h.gpart[0])))
	}
	weights := weightsF32(w.Weights, c.WDType, c.T*c.K)
	p := cpuProblem{
		T: T, K: K, Hidden: hidden, Inter: inter, F16: c.DType == dtype.F16,
		X: x, PartialOut: out, Scratch: uint64(uintptr(unsafe.Pointer(&h.scratch[0]))),
		Weights: make([]float32, P), Gate: make([]uint64, P), Up: make([]uint64, P), Down: make([]uint64, P),
	}
	for i, t := range toks {
		for j := int64(0); j < K; j++ {
			src, dst := t*K+j, int64(i)*K+j
			p.Weights[dst] = weights[src]
			if r, ok := onCPU(topk[src]); ok {
				p.Gate[dst], p.Up[dst], p.Down[dst] = r[0], r[1], r[2]
			}
		}
	}
	if T > 0 {
		if err := h.k.run(p); err != nil {
			return err
		}
	}
	if gather {
		dst := unsafe.Slice((*float32)(backend.HostPtr(w.Partial)), c.T*hidden)
		clear(dst)
		for i, t := range toks {
			copy(dst[t*hidden:(t+1)*hidden], h.gpart[int64(i)*hidden:int64(i+1)*hidden])
		}
	}
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

// weightsF32 reads the P routing weights at addr (of wdt: dtype.F32,
// BF16 or F16) as float32.
func weightsF32(addr uint64, wdt dtype.DType, P int64) []float32 {
	out := make([]float32, P)
	ptr := backend.HostPtr(addr)
	dst := unsafe.Slice((*byte)(unsafe.Pointer(&out[0])), 4*P)
	switch wdt {
	case dtype.BF16, dtype.F16:
		_ = dtype.Convert(dst, dtype.F32, unsafe.Slice((*byte)(ptr), 2*P), wdt)
	default:
		copy(out, unsafe.Slice((*float32)(ptr), P))
	}
	return out
}
