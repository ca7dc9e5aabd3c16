package cache

// LayerStats counts cache events of one MoE layer. Every use of an expert
// (one key in one Pin call) is exactly one hit or one miss.
type LayerStats struct {
	// Hits counts uses that found the expert ready.
	Hits uint64 `json:"hits"`
	// Misses counts uses that found the expert absent or still loading.
	Misses uint64 `json:"misses"`
	// PrefetchHits counts hits on an expert brought in by a prefetch and
	// not used before (a subset of Hits).
	PrefetchHits uint64 `json:"prefetch_hits"`
	// LatePrefetches counts misses that found a prefetch of the expert
	// already in flight, so the wait was shorter than a full load (a
	// subset of Misses).
	LatePrefetches uint64 `json:"late_prefetches"`
	// WastedPrefetches counts prefetched experts evicted before any use.
	WastedPrefetches uint64 `json:"wasted_prefetches"`
	// Loads counts on-demand loads started by Pin.
	Loads uint64 `json:"loads"`
	// PrefetchLoads counts loads started by ReservePrefetch.
	PrefetchLoads uint64 `json:"prefetch_loads"`
	// Evictions counts experts dropped to make room.
	Evictions uint64 `json:"evictions"`
}

// Add accumulates o into s.
func (s *LayerStats) Add(o LayerStats) {
	s.Hits += o.Hits
	s.Misses += o.Misses
	s.PrefetchHits += o.PrefetchHits
	s.LatePrefetches += o.LatePrefetches
	s.WastedPrefetches += o.WastedPrefetches
	s.Loads += o.Loads
	s.PrefetchLoads += o.PrefetchLoads
	s.Evictions += o.Evictions
}

// Stats returns a copy of the per-layer counters.
func (c *Cache) Stats() []LayerStats {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]LayerStats, len(c.stats))
	copy(out, c.stats)
	return out
}

// ResetStats zeroes every counter.
func (c *Cache) ResetStats() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i := range c.stats {
		c.stats[i] = LayerStats{}
	}
}
