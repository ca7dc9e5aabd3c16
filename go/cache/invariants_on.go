//go:build invariants

package cache

import "fmt"

// invariantsEnabled reports whether the invariants build tag is set.
const invariantsEnabled = true

// checkLocked verifies the cache's internal consistency and panics on a
// violation. Only built with -tags invariants.
func (c *Cache) checkLocked() {
	seen := make(map[Key]int, len(c.index))
	for i := range c.slots {
		s := &c.slots[i]
		if s.pins < 0 {
			panic(fmt.Sprintf("cache invariant: slot %d has %d pins", i, s.pins))
		}
		if s.state == Empty {
			if j, ok := c.index[s.key]; ok && j == i {
				panic(fmt.Sprintf("cache invariant: empty slot %d still indexed as %v", i, s.key))
			}
			continue
		}
		if j, ok := seen[s.key]; ok {
			panic(fmt.Sprintf("cache invariant: %v in slots %d and %d", s.key, j, i))
		}
		seen[s.key] = i
		if j, ok := c.index[s.key]; !ok || j != i {
			panic(fmt.Sprintf("cache invariant: slot %d holds %v but index says %d (present %v)", i, s.key, j, ok))
		}
	}
	if len(seen) != len(c.index) {
		panic(fmt.Sprintf("cache invariant: index has %d keys, slots hold %d", len(c.index), len(seen)))
	}
}
