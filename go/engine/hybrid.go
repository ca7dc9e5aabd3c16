package engine

import (
	"math"
	"sort"
	"sync"
)

// Hybrid execution: for each expert a layer call misses (neither in a
// slot nor on its way into one), the executor chooses how it is served:
// copied into a slot over the link, read in place by the device's kernels
// over the link, or computed by the CPU where it lies in host memory.
// ChooseMisses makes that choice from a cost model (HybridCosts, measured
// at Configure or injected by tests) and the EAMC's prediction of the
// expert's reuse; it is a pure function, so every branch is tested on any
// machine (hybrid_test.go).

// MissWay is how one missed expert of a layer call is served.
type MissWay uint8

const (
	// MissCopy: copied into a slot (admitted to the cache, possibly
	// evicting another expert) and computed by the device.
	MissCopy MissWay = iota
	// MissRead: read in place from host memory by the device's kernels,
	// over the link; not copied for the call (the cache may copy it into
	// a slot behind the call, by the same admission rule as MissCPU).
	MissRead
	// MissCPU: computed by the CPU from host memory; it does not cross the
	// link for the call. Afterwards the cache decides, by its admission
	// rule, whether it is copied into a slot behind the call (as for an
	// in-place read: Engine.useOnCPU).
	MissCPU
)

// String names the way ("copy", "read", "cpu").
func (w MissWay) String() string {
	switch w {
	case MissCopy:
		return "copy"
	case MissRead:
		return "read"
	case MissCPU:
		return "cpu"
	}
	return "MissWay(?)"
}

// HybridCosts is the cost model of hybrid execution: how fast the link
// and the CPU each serve a missed expert, and how much they slow each
// other when they run at once (both read host DRAM). Rates are in GB/s
// (1e9 bytes a second) of expert weights as stored; times in µs.
type HybridCosts struct {
	// LinkGBps is the rate of copies into slots: the copy engine's DMA
	// rate on a GPU (LinkRates.DMAGBps), the copy workers' on the CPU
	// backend. > 0.
	LinkGBps float64 `json:"link_gbps"`
	// ReadGBps is the rate at which the device's kernels read experts in
	// place (LinkRates.ZeroCopyGBps); 0 when unknown.
	ReadGBps float64 `json:"read_gbps"`
	// LinkFixedUs is the fixed cost, per layer call that sends anything
	// over the link, before the first byte moves (LinkRates.ReactionUs in
	// copy mode), in µs.
	LinkFixedUs float64 `json:"link_fixed_us"`
	// CPUGBps is the CPU FFN's rate for one token: an expert's weight
	// bytes over the time to compute it for one token (package cpuffn,
	// with the threads cpu_experts gives it). > 0 for the CPU to be used.
	CPUGBps float64 `json:"cpu_gbps"`
	// CPUTokenCost is the time each further token routed to an expert adds
	// to its CPU FFN, as a fraction of its one-token time (the FFN reads
	// the weights once per call; more tokens add arithmetic). >= 0.
	CPUTokenCost float64 `json:"cpu_token_cost"`
	// CPUFixedUs is the fixed cost, per layer call that computes anything
	// on the CPU, of handing the work over (activations to the host and
	// the partial output back on a GPU; staging on the CPU backend is in
	// CPUGBps), in µs.
	CPUFixedUs float64 `json:"cpu_fixed_us"`
	// HandOffFixedUs is the fixed cost, per layer call that computes
	// anything on the CPU, of the backend's hand-off (backend.HandOff:
	// the activations to the host, the partial output back), in µs; it
	// joins CPUFixedUs. 0 on the CPU backend, whose hand-off copies
	// nothing; on CUDA the backend's estimate from the link's rates.
	HandOffFixedUs float64 `json:"hand_off_fixed_us"`
	// LinkShare and CPUShare are the fractions of its rate each side keeps
	// while the other runs, in (0, 1]: measured by running both at once.
	// On one H100 host the link kept 0.87 and torch's CPU FFN 0.51.
	LinkShare float64 `json:"link_share"`
	CPUShare  float64 `json:"cpu_share"`
	// ISAOne and ISAMany name the instruction sets the CPU's FFN runs for
	// calls of one token and of more (package cpuffn's names: the fastest
	// of each on the model's shape when measured); "" when injected.
	ISAOne  string `json:"isa_one,omitempty"`
	ISAMany string `json:"isa_many,omitempty"`
}

// usable reports whether c can compare the CPU with the link.
func (c HybridCosts) usable() bool {
	ok := func(v float64) bool { return v > 0 && !math.IsInf(v, 0) }
	share := func(v float64) bool { return v > 0 && v <= 1 }
	return ok(c.LinkGBps) && ok(c.CPUGBps) && c.CPUTokenCost >= 0 && c.LinkFixedUs >= 0 && c.CPUFixedUs >= 0 &&
		c.HandOffFixedUs >= 0 && !math.IsInf(c.HandOffFixedUs, 0) &&
		share(c.LinkShare) && share(c.CPUShare) && !math.IsInf(c.CPUTokenCost, 0)
}

// Miss is one missed expert of a layer call.
type Miss struct {
	// Expert is the expert's index in its layer.
	Expert int32
	// Tokens is how many of the call's tokens are routed to it (>= 1).
	Tokens int64
	// Reuse is the EAMC's prediction of the share of the layer's tokens
	// that will use the expert in the requests' coming tokens (predicted
	// share of the layer's routing × top-k, as the prefetch planner's
	// MinTokenShare reads it); 0 without a prediction.
	Reuse float64
}

// MissInputs is everything ChooseMisses looks at.
type MissInputs struct {
	// Costs is the cost model.
	Costs HybridCosts
	// ExpertBytes is one expert's size as stored, in bytes.
	ExpertBytes int64
	// Misses are the call's missed experts.
	Misses []Miss
	// CPU: the CPU may compute this call's misses (cpu_experts on, the
	// experts readable from host memory). MaxCPU bounds how many (0: no
	// bound; the CPU backend stages experts read from files, and its
	// staging buffers are bounded).
	CPU    bool
	MaxCPU int
	// Read: the device's kernels can read this call's misses in place.
	Read bool
	// HotShare is the Reuse from which a miss is hot (worth a slot).
	HotShare float64
}

// MissPlan is ChooseMisses' answer.
type MissPlan struct {
	// Ways[i] is how Misses[i] is served.
	Ways []MissWay
	// LinkS and CPUS are the seconds of work each side gets at its solo
	// rate (fixed costs included); FinishS is when the cost model expects
	// the last of the layer's misses done (Makespan of the two).
	LinkS, CPUS, FinishS float64
}

// ChooseMisses decides how each missed expert of a layer call is served.
//
// The rule:
//
//  1. A hot miss (Reuse >= HotShare: the EAMC predicts the requests will
//     use it again for a good share of their tokens) is worth a slot: it
//     is copied (MissCopy), whatever the cost.
//  2. A cold miss crosses the link only if that is cheaper than the CPU:
//     on the link it costs ExpertBytes / rate seconds, at the in-place
//     read rate when the device can read it in place and that is no
//     slower than copying (MissRead: a cold expert is not copied for the call), else
//     at the copy rate (MissCopy); on the CPU it costs
//     ExpertBytes / CPUGBps · (1 + (Tokens − 1)·CPUTokenCost) seconds.
//  3. Cold misses are taken fewest tokens first (those are cheapest on
//     the CPU, while their link cost does not depend on tokens), ties by
//     expert. Each goes to the CPU when that makes the layer finish
//     strictly earlier (Makespan of the link's and the CPU's queues,
//     contention included) than sending it over the link; ties go to the
//     link. A side's fixed cost (LinkFixedUs; CPUFixedUs + HandOffFixedUs)
//     joins its queue with its first expert.
//
// Without the CPU (CPU false, MaxCPU reached, or costs that cannot be
// compared) every cold miss crosses the link as in step 2.
func ChooseMisses(in MissInputs) MissPlan {
	plan := MissPlan{Ways: make([]MissWay, len(in.Misses))}
	c := in.Costs
	b := float64(in.ExpertBytes)
	copyS := 0.0
	if c.LinkGBps > 0 {
		copyS = b / (c.LinkGBps * 1e9)
	}
	linkWay, linkS := MissCopy, copyS
	if in.Read && c.ReadGBps > 0 {
		if readS := b / (c.ReadGBps * 1e9); c.LinkGBps <= 0 || readS <= copyS {
			linkWay, linkS = MissRead, readS
		}
	}
	cpuOK := in.CPU && c.usable()
	link, cpu := 0.0, 0.0
	addLink := func(s float64) {
		if link == 0 {
			link = c.LinkFixedUs * 1e-6
		}
		link += s
	}
	var cold []int
	for i, m := range in.Misses {
		if m.Reuse >= in.HotShare && m.Reuse > 0 {
			plan.Ways[i] = MissCopy
			addLink(copyS)
			continue
		}
		cold = append(cold, i)
	}
	sort.SliceStable(cold, func(a, b int) bool {
		ma, mb := in.Misses[cold[a]], in.Misses[cold[b]]
		if ma.Tokens != mb.Tokens {
			return ma.Tokens < mb.Tokens
		}
		return ma.Expert < mb.Expert
	})
	onCPU := 0
	for _, i := range cold {
		m := in.Misses[i]
		if cpuOK && (in.MaxCPU <= 0 || onCPU < in.MaxCPU) {
			cpuS := b / (c.CPUGBps * 1e9) * (1 + float64(max(m.Tokens-1, 0))*c.CPUTokenCost)
			withLink := link + linkS
			if link == 0 {
				withLink += c.LinkFixedUs * 1e-6
			}
			withCPU := cpu + cpuS
			if cpu == 0 {
				withCPU += (c.CPUFixedUs + c.HandOffFixedUs) * 1e-6
			}
			if Makespan(link, withCPU, c) < Makespan(withLink, cpu, c) {
				plan.Ways[i] = MissCPU
				cpu = withCPU
				onCPU++
				continue
			}
		}
		plan.Ways[i] = linkWay
		addLink(linkS)
	}
	plan.LinkS, plan.CPUS, plan.FinishS = link, cpu, Makespan(link, cpu, c)
	return plan
}

// Makespan is when the link's and the CPU's queues of linkS and cpuS
// seconds (at their solo rates) are both done when started together: while
// both run, each goes at its share of its rate (c.LinkShare, c.CPUShare);
// once one is done the other goes at its full rate. In seconds.
func Makespan(linkS, cpuS float64, c HybridCosts) float64 {
	if linkS <= 0 || cpuS <= 0 {
		return max(linkS, cpuS, 0)
	}
	ls, cs := c.LinkShare, c.CPUShare
	if ls <= 0 || ls > 1 {
		ls = 1
	}
	if cs <= 0 || cs > 1 {
		cs = 1
	}
	a, b := linkS/ls, cpuS/cs // each side's time if the other ran throughout
	if a <= b {
		return a + (cpuS - a*cs)
	}
	return b + (linkS - b*ls)
}

// CPUFinish is when the CPU's queue of cpuS seconds (at its solo rate) is
// done while the link's queue of linkS seconds runs beside it: Makespan's
// CPU side. In seconds; 0 when cpuS is.
func CPUFinish(linkS, cpuS float64, c HybridCosts) float64 {
	if cpuS <= 0 {
		return 0
	}
	if linkS <= 0 {
		return cpuS
	}
	ls, cs := c.LinkShare, c.CPUShare
	if ls <= 0 || ls > 1 {
		ls = 1
	}
	if cs <= 0 || cs > 1 {
		cs = 1
	}
	a, b := linkS/ls, cpuS/cs
	if b <= a {
		return b
	}
	return a + (cpuS - a*cs)
}

// CPUCalibration corrects the cost model's CPU side with what the CPU's
// experts actually took in use. The probe behind CPUGBps runs alone at
// Configure; in use the CPU shares DRAM with the link's DMA, wakes its
// threads once per layer and competes with the caller's threads, and on
// one H100 host the experts took twice what the probe predicted. Each
// hybrid layer call reports what ChooseMisses expected of the CPU
// (CPUFinish under the calibrated costs) and what it took; Scale, the
// factor by which the CPU side is slower than the probe said, moves a
// fifth of the way (in log space) towards each call's ratio, each ratio
// clamped to [1/2, 2] so that one outlier (a page fault, a preempted
// thread) moves it by at most 15%. The zero value is ready: Scale 1.
// Safe for concurrent use.
type CPUCalibration struct {
	mu    sync.Mutex
	log   float64 // ln Scale
	calls int64
}

// calibrationStep is the weight of one call's ratio (in log space).
const calibrationStep = 0.2

// Observe adds one layer call: the CPU was expected to finish in
// expectS seconds and took tookS. Calls without an expectation, or
// without a measured time, are ignored.
func (k *CPUCalibration) Observe(expectS, tookS float64) {
	if !(expectS > 0) || !(tookS > 0) || math.IsInf(expectS, 0) || math.IsInf(tookS, 0) {
		return
	}
	r := min(max(tookS/expectS, 0.5), 2)
	k.mu.Lock()
	k.log += calibrationStep * math.Log(r)
	k.calls++
	k.mu.Unlock()
}

// Scale is how many times longer than the probe's figures the CPU side
// takes (1 until observed; > 1 slower, < 1 faster).
func (k *CPUCalibration) Scale() float64 {
	k.mu.Lock()
	defer k.mu.Unlock()
	return math.Exp(k.log)
}

// Reset forgets every observation: Scale 1.
func (k *CPUCalibration) Reset() {
	k.mu.Lock()
	k.log, k.calls = 0, 0
	k.mu.Unlock()
}

// Calls is the number of layer calls observed.
func (k *CPUCalibration) Calls() int64 {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.calls
}

// ScaleCPU returns c with its CPU side s times slower: CPUGBps divided
// by s, the CPU's fixed costs multiplied by it (s > 0; else c).
func (c HybridCosts) ScaleCPU(s float64) HybridCosts {
	if !(s > 0) || math.IsInf(s, 0) {
		return c
	}
	c.CPUGBps /= s
	c.CPUFixedUs *= s
	c.HandOffFixedUs *= s
	return c
}
