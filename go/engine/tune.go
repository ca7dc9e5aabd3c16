package engine

import (
	"fmt"

	"github.com/moe-infinity/moe_infinity/go/cache"
	"github.com/moe-infinity/moe_infinity/go/strictjson"
)

// Tuning changes a configured engine's behaviour at run time; nil fields
// are left as they are.
type Tuning struct {
	// Policy switches the eviction policy ("priority", "lru", "lfu";
	// exact names, as Config.Policy).
	Policy *string `json:"policy,omitempty"`
	// Prefetch switches prefetching on or off (off also drops the queue).
	Prefetch *bool `json:"prefetch,omitempty"`
	// GraphMisses switches how the next captured step gets its missed
	// experts (Config.GraphMisses).
	GraphMisses *string `json:"graph_misses,omitempty"`
	// CPUExperts pauses ("off") or resumes ("auto", or a thread count)
	// the hybrid execution that configure set up (Config.CPUExperts):
	// while paused the CPU computes no expert and every miss crosses the
	// link as without it. A thread count other than the CPU side's
	// current one (the plan's cpu_threads; "auto" is the host's cores on
	// a device backend) measures the CPU's figures again on that many
	// threads and restarts the calibration. Resuming an engine whose
	// configure set none up is an error naming why (the plan's
	// hybrid_off). CUDA-graph steps follow at their next capture, as for
	// GraphMisses.
	CPUExperts *CPUExperts `json:"cpu_experts,omitempty"`
	// KernelMaxTokens gives the kernel crossover measured on this machine
	// and model: the most tokens (1..KernelMaxTokens, the package's) for
	// which the fused kernels beat the caller's expert code. Layer calls of
	// more tokens run the caller's code on slot views. 0 goes back to the
	// default crossover (KernelWins). The plan's executor reports it
	// (kernel_max_tokens, kernel_crossover "measured" or "default").
	KernelMaxTokens *int64 `json:"kernel_max_tokens,omitempty"`
	// Flush empties every slot that is not pinned or loading.
	Flush bool `json:"flush,omitempty"`
	// ResetStats zeroes the counters (after the other changes).
	ResetStats bool `json:"reset_stats,omitempty"`
}

// ParseTuning decodes a JSON Tuning (one object, keys spelled exactly as
// the json tags, nothing after it: strictjson.Decode). A name setting
// given as "" or null is an error, as in ParseConfig; its value is checked
// by Tune.
func ParseTuning(b []byte) (Tuning, error) {
	var t Tuning
	if err := strictjson.Decode(b, &t); err != nil {
		return Tuning{}, fmt.Errorf("%w: tuning: %v", ErrInvalid, err)
	}
	if err := checkGiven(b, append(t.names(), t.cpuExperts())); err != nil {
		return Tuning{}, err
	}
	return t, nil
}

// cpuExperts is t's CPUExperts as a name setting, for checkGiven (a JSON
// null is an error). It is not among names(), whose settings Tune writes
// into the Config: it pauses or resumes hybrid execution and leaves
// Config.CPUExperts as configured.
func (t *Tuning) cpuExperts() nameValue {
	var v *string
	if t.CPUExperts != nil {
		b, _ := t.CPUExperts.MarshalJSON()
		s := string(b)
		v = &s
	}
	return nameValue{cpuExpertsSetting, v}
}

// names lists t's name settings that set a Config field (nil values: not
// given).
func (t *Tuning) names() []nameValue {
	return []nameValue{{policySetting, t.Policy}, {graphMissesSetting, t.GraphMisses}}
}

// Tune applies t. Used by benchmarks to compare policies on one loaded
// model, and by users to change settings without reloading.
func (e *Engine) Tune(t Tuning) error {
	if err := e.readyLocked(); err != nil {
		return err
	}
	for _, nv := range t.names() {
		if nv.value != nil {
			if _, err := nv.setting.parse(*nv.value, true); err != nil {
				return err
			}
		}
	}
	if n := t.KernelMaxTokens; n != nil {
		if *n < 0 || *n > KernelMaxTokens {
			return fmt.Errorf("%w: kernel_max_tokens %d: give 1..%d tokens (the most a kernel call takes), or 0 for the default crossover", ErrInvalid, *n, KernelMaxTokens)
		}
		e.mu.Lock()
		kernels, off := e.plan.Executor.Kernels, e.plan.Executor.KernelsOff
		e.mu.Unlock()
		if !kernels && *n > 0 {
			return fmt.Errorf("%w: kernel_max_tokens: the expert kernels do not serve this model: %s", ErrUnsupported, off)
		}
	}
	if c := t.CPUExperts; c != nil {
		if err := e.tuneCPUExperts(*c); err != nil {
			return err
		}
	}
	if n := t.KernelMaxTokens; n != nil {
		e.mu.Lock()
		p := &e.plan.Executor
		if *n == 0 {
			p.KernelMaxTokens, p.KernelSmallExpertBytes, p.KernelCrossover = KernelMaxTokens, KernelSmallExpertBytes, CrossoverDefault
		} else {
			p.KernelMaxTokens, p.KernelSmallExpertBytes, p.KernelCrossover = *n, e.lay.SourceBytes, CrossoverMeasured
		}
		e.mu.Unlock()
	}
	if t.Policy != nil {
		p, err := cache.ParsePolicy(*t.Policy)
		if err != nil {
			return fmt.Errorf("%w: %v", ErrInvalid, err)
		}
		e.cache.SetPolicy(p)
		e.mu.Lock()
		e.plan.Policy = p.String()
		e.cfg.Policy = p.String()
		e.mu.Unlock()
	}
	if t.Prefetch != nil {
		e.core.SetPrefetch(*t.Prefetch)
		e.mu.Lock()
		e.plan.Prefetch = *t.Prefetch
		e.mu.Unlock()
	}
	if t.GraphMisses != nil {
		e.mu.Lock()
		e.cfg.GraphMisses = *t.GraphMisses
		e.plan.GraphMisses = e.resolveGraphMisses()
		e.mu.Unlock()
	}
	if t.Flush {
		e.drainMapped()
		e.cache.Flush()
		if e.views != nil {
			e.views.forget()
		}
		if mb := e.ft.Mapped; mb != nil && e.mapped.idle != nil {
			if err := mb.UnmapAll(); err != nil {
				return err
			}
		}
	}
	if t.ResetStats {
		return e.ResetStats()
	}
	return nil
}
