// Package cache manages the device expert cache: a fixed number of equally
// sized slots, which expert occupies which slot, which slots are pinned by a
// computation in flight, and which slot to evict next.
//
// The cache does no I/O. A caller that is granted a slot with Grant.Load set
// must fill the slot (through a backend) and then call Complete. Everything
// else — hits, waiting for a load someone else started, eviction, pins — is
// decided here under one mutex, so that an expert is loaded at most once
// however many callers ask for it (the slot in state Loading is the in-flight
// map).
package cache

import "fmt"

// Key identifies one routed expert: the MoE layer's index in execution order
// (0-based) and the expert's index within that layer.
type Key struct {
	Layer  int32
	Expert int32
}

// String formats the key as "L<layer>/E<expert>".
func (k Key) String() string { return fmt.Sprintf("L%d/E%d", k.Layer, k.Expert) }

// State is the state of one cache slot.
type State uint8

const (
	// Empty slots hold no expert.
	Empty State = iota
	// Loading slots are being filled; their expert becomes usable when the
	// load completes.
	Loading
	// Ready slots hold a complete copy of their expert.
	Ready
)

// String returns the state's name.
func (s State) String() string {
	switch s {
	case Empty:
		return "empty"
	case Loading:
		return "loading"
	case Ready:
		return "ready"
	}
	return fmt.Sprintf("State(%d)", uint8(s))
}
