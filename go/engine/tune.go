package engine

import (
	"fmt"

	"github.com/moe-infinity/moe_infinity/go/backend"
	"github.com/moe-infinity/moe_infinity/go/cache"
)

// Tuning changes a configured engine's behaviour at run time; nil fields
// are left as they are.
type Tuning struct {
	// Policy switches the eviction policy ("priority", "lru", "lfu").
	Policy *string `json:"policy,omitempty"`
	// Prefetch switches prefetching on or off (off also drops the queue).
	Prefetch *bool `json:"prefetch,omitempty"`
	// GraphMisses switches how the next captured step gets its missed
	// experts (Config.GraphMisses).
	GraphMisses *string `json:"graph_misses,omitempty"`
	// Flush empties every slot that is not pinned or loading.
	Flush bool `json:"flush,omitempty"`
	// ResetStats zeroes the counters (after the other changes).
	ResetStats bool `json:"reset_stats,omitempty"`
}

// Tune applies t. Used by benchmarks to compare policies on one loaded
// model, and by users to change settings without reloading.
func (e *Engine) Tune(t Tuning) error {
	if err := e.readyLocked(); err != nil {
		return err
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
		e.prefetchOn.Store(*t.Prefetch)
		if !*t.Prefetch {
			e.queue.Clear()
		}
		e.mu.Lock()
		e.plan.Prefetch = *t.Prefetch
		e.mu.Unlock()
	}
	if t.GraphMisses != nil {
		gm, err := graphMisses(*t.GraphMisses)
		if err != nil {
			return err
		}
		e.mu.Lock()
		e.cfg.GraphMisses = gm
		e.plan.GraphMisses = e.resolveGraphMisses()
		e.mu.Unlock()
	}
	if t.Flush {
		e.drainMapped()
		e.cache.Flush()
		if mb, ok := e.be.(backend.Mapped); ok && e.mapped.idle != nil {
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
