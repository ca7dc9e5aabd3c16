package sim

import "math"

// never is the next-use index of a key that is not used again.
const never = math.MaxInt

// Belady returns the hits and accesses of Belady's offline optimal (MIN)
// cache of the given number of slots on t's access sequence: every expert
// of every token's layer group, request by request, token by token, layer
// by layer, in the order the group lists them, starting from an empty
// cache. On a miss with every slot full it evicts the resident key whose
// next use is farthest in the future (a key never used again is infinitely
// far; among equally far keys the lowest (layer, expert) goes first), but
// never a key of the current group, which must be resident together as
// with Cache.Pin. Only on-demand loads are counted, so this bounds the hits
// of every replay without prefetching (the tests check it against an
// exhaustive search on small traces).
//
// It runs in O(n log slots) time and O(n) memory for n accesses. If t is
// invalid, slots < 1, or slots is smaller than a group (so no replay could
// run), it returns 0 hits and the trace's access count (0 for a nil
// trace).
func Belady(t *Trace, slots int) (hits, accesses uint64) {
	if t == nil {
		return 0, 0
	}
	if t.Validate() != nil || slots < 1 || slots < t.MaxGroup() {
		return 0, t.Accesses()
	}
	E := t.Experts
	// Flatten: seq[i] is the key index (layer*E+expert) of access i; group[i]
	// numbers the layer group access i belongs to.
	n := int(t.Accesses())
	seq := make([]int32, 0, n)
	group := make([]int32, 0, n)
	g := int32(0)
	for _, req := range t.Requests {
		for _, tok := range req.Tokens {
			for l, grp := range tok {
				for _, x := range grp {
					seq = append(seq, int32(l*E+int(x)))
					group = append(group, g)
				}
				g++
			}
		}
	}
	// next[i] is the index of the next access of seq[i] after i.
	next := make([]int, n)
	last := make([]int, t.Layers*E)
	for i := range last {
		last[i] = never
	}
	for i := n - 1; i >= 0; i-- {
		next[i] = last[seq[i]]
		last[seq[i]] = i
	}
	inGroup := last // reuse: inGroup[key] = the group that last touched key
	for i := range inGroup {
		inGroup[i] = -1
	}

	h := newNextHeap(t.Layers*E, slots)
	var held []int32
	for i, k := range seq {
		inGroup[k] = int(group[i])
		if h.contains(k) {
			hits++
			h.update(k, next[i])
			continue
		}
		if h.len() == slots {
			// Evict the farthest key outside the current group.
			held = held[:0]
			for h.len() > 0 && inGroup[h.top()] == int(group[i]) {
				held = append(held, h.pop())
			}
			h.pop() // non-empty: the group has fewer keys than slots
			for _, x := range held {
				h.push(x, h.saved(x))
			}
		}
		h.push(k, next[i])
	}
	return hits, uint64(n)
}

// nextHeap is an indexed max-heap of resident keys ordered by next use
// (ties: lower key first), so the top is Belady's victim.
type nextHeap struct {
	keys []int32
	next []int // next[key]: the key's next use (kept after pop for saved)
	pos  []int // pos[key]: index in keys, or -1 when absent
}

func newNextHeap(universe, capacity int) *nextHeap {
	h := &nextHeap{keys: make([]int32, 0, capacity), next: make([]int, universe), pos: make([]int, universe)}
	for i := range h.pos {
		h.pos[i] = -1
	}
	return h
}

func (h *nextHeap) len() int              { return len(h.keys) }
func (h *nextHeap) contains(k int32) bool { return h.pos[k] >= 0 }
func (h *nextHeap) top() int32            { return h.keys[0] }
func (h *nextHeap) saved(k int32) int     { return h.next[k] }

// above reports whether key a belongs above key b.
func (h *nextHeap) above(a, b int32) bool {
	if h.next[a] != h.next[b] {
		return h.next[a] > h.next[b]
	}
	return a < b
}

func (h *nextHeap) push(k int32, next int) {
	h.next[k] = next
	h.pos[k] = len(h.keys)
	h.keys = append(h.keys, k)
	h.up(len(h.keys) - 1)
}

func (h *nextHeap) pop() int32 {
	k := h.keys[0]
	last := len(h.keys) - 1
	h.swap(0, last)
	h.keys = h.keys[:last]
	h.pos[k] = -1
	if last > 0 {
		h.down(0)
	}
	return k
}

func (h *nextHeap) update(k int32, next int) {
	h.next[k] = next
	i := h.pos[k]
	h.up(i)
	h.down(h.pos[k])
}

func (h *nextHeap) swap(i, j int) {
	h.keys[i], h.keys[j] = h.keys[j], h.keys[i]
	h.pos[h.keys[i]] = i
	h.pos[h.keys[j]] = j
}

func (h *nextHeap) up(i int) {
	for i > 0 {
		p := (i - 1) / 2
		if !h.above(h.keys[i], h.keys[p]) {
			return
		}
		h.swap(i, p)
		i = p
	}
}

func (h *nextHeap) down(i int) {
	for {
		b := i
		l, r := 2*i+1, 2*i+2
		if l < len(h.keys) && h.above(h.keys[l], h.keys[b]) {
			b = l
		}
		if r < len(h.keys) && h.above(h.keys[r], h.keys[b]) {
			b = r
		}
		if b == i {
			return
		}
		h.swap(i, b)
		i = b
	}
}
