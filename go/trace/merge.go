package trace

import (
	"maps"
	"math"
	"path/filepath"
	"slices"
)

// Sharing one trace file between processes
//
// Several processes (Ray Serve replicas, a notebook beside a server) may
// load and save the same trace file. SaveFile therefore does not simply
// replace the file with the collection in memory, which would keep only
// the last writer's EAMs. Under an exclusive advisory lock on <path>.lock
// it loads the collection currently in the file and writes back the file's
// EAMs followed by the EAMs this collection recorded since it last loaded
// or saved that file, each added under Add's replacement rule (so when the
// result is full, a new EAM replaces the stored EAM most similar to it).
//
// Identity. The file format stores bare counts, so an EAM's identity is its
// content: eamID, a 64-bit FNV-1a hash of the bit patterns of its counts.
// The collection remembers, per file (absolute path), the multiset of ids
// it loaded from that file (LoadFile) or last saved to it (SaveFile): its
// synced set. At save, an id that occurs k times in memory and s times in
// the synced set contributes its last k-s occurrences (none if k <= s):
//
//   - EAMs loaded from the file and saved back are not counted twice;
//   - two requests that produced identical EAMs, here and in another
//     process, are both kept, as Add keeps both in memory;
//   - an EAM another process added to the file is kept (the file is the
//     starting point), and one that this collection loaded and has since
//     replaced is not written back a second time.
//
// A hash collision (two different EAMs with one id, probability about
// n^2/2^65 for n distinct EAMs) can at worst drop one new EAM from a save.
// The in-memory collection itself is never changed by a save: EAMs that
// other processes saved are picked up by the next load.

// eamID returns the identity of m used when merging collections: the 64-bit
// FNV-1a hash of the little-endian bit patterns of its counts. Equal counts
// give equal ids in every process and on every platform.
func eamID(m *EAM) uint64 {
	const (
		offset64 = 14695981039346656037
		prime64  = 1099511628211
	)
	h := uint64(offset64)
	for _, v := range m.Counts {
		b := math.Float32bits(v)
		for range 4 {
			h ^= uint64(b & 0xff)
			h *= prime64
			b >>= 8
		}
	}
	return h
}

// idCounts returns the multiset of the ids of es's EAMs.
func idCounts(es []entry) map[uint64]int {
	ids := make(map[uint64]int, len(es))
	for _, e := range es {
		ids[eamID(e.m)]++
	}
	return ids
}

// syncKey returns the key under which the synced set of the trace file at
// path is kept: its absolute, cleaned path (path itself if that fails).
func syncKey(path string) string {
	if abs, err := filepath.Abs(path); err == nil {
		return abs
	}
	return filepath.Clean(path)
}

// merge returns the collection that SaveFile writes: a new collection of
// the given shape and capacity holding disk's EAMs in order (disk may be
// nil: none) and then the EAMs of mine that are new relative to synced (an
// id's occurrences in mine beyond its count in synced, the later ones), each
// inserted under Add's replacement rule. disk and mine must hold valid EAMs
// of that shape; their EAMs are shared, not copied (stored EAMs are never
// mutated).
func merge(disk []entry, mine []entry, synced map[uint64]int, layers, experts, capacity int) (*Collection, error) {
	out, err := NewCollection(layers, experts, capacity)
	if err != nil {
		return nil, err
	}
	for _, e := range disk {
		out.insertLocked(e) // out is not shared yet
	}
	left := maps.Clone(synced)
	for _, e := range mine {
		if id := eamID(e.m); left[id] > 0 {
			left[id]--
			continue
		}
		out.insertLocked(e)
	}
	return out, nil
}

// markSynced records ids as the multiset of EAMs that the trace file key
// holds from this collection's point of view.
func (c *Collection) markSynced(key string, ids map[uint64]int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.synced == nil {
		c.synced = make(map[string]map[uint64]int)
	}
	c.synced[key] = ids
}

// WithCapacity returns a new collection of c's shape holding at most
// capacity EAMs (>= 1, and capacity*layers*experts <= MaxFloats): c's EAMs
// added in order under Add's replacement rule. The copy keeps c's record of
// which EAMs it loaded from or saved to which trace file, so that saving
// the copy to the file c was loaded from does not count those EAMs twice
// (see SaveFile).
func (c *Collection) WithCapacity(capacity int) (*Collection, error) {
	out, err := NewCollection(c.layers, c.experts, capacity)
	if err != nil {
		return nil, err
	}
	c.mu.RLock()
	defer c.mu.RUnlock()
	for _, e := range c.entries {
		out.insertLocked(e) // out is not shared yet; entries are immutable
	}
	if c.synced != nil {
		out.synced = make(map[string]map[uint64]int, len(c.synced))
		for k, ids := range c.synced {
			out.synced[k] = maps.Clone(ids)
		}
	}
	return out, nil
}

// snapshotForSave returns the stored entries (sharing their immutable EAMs)
// and a copy of the synced set of key.
func (c *Collection) snapshotForSave(key string) ([]entry, map[uint64]int) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return slices.Clone(c.entries), maps.Clone(c.synced[key])
}
