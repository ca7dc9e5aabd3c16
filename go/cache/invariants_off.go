//go:build !invariants

package cache

// invariantsEnabled reports whether the invariants build tag is set.
const invariantsEnabled = false

// checkLocked is a no-op without the invariants build tag.
func (c *Cache) checkLocked() {}
