package trace

// Incremental matching. A request's EAM grows one row at a time (Tracker.
// Observe adds a layer's routing to row l), and after each row the engine
// matches the partial EAM over layers [0, l] against every stored EAM.
// Rescanning the collection costs O(N·nonzeros(q)) per layer; a matcher
// instead keeps, per stored EAM i and layer l, the dot product d[l][i] of
// the two rows l and the prefix p[i] = Σ_{l' ≤ cur} d[l'][i], and updates
// them by the counts that changed: O(N·nonzeros(Δ)) per observed layer
// plus O(N) to move the prefix one layer and rank the N similarities.
//
// Exactness: the dot products are sums of products of counts, in another
// order than the full scan (query.dot). For integer counts (token counts,
// what the engine observes) with dot products below 2^53 every product
// and partial sum is an exact integer, so both orders give the same
// float64 and the matches are bitwise those of Collection.Match. For
// fractional counts the similarities agree to rounding (a relative error
// of about nonzeros·2^-53), so near-ties may rank differently.
//
// Memory: the first incremental match builds a transposed copy of the
// stored counts (as large as the collection: 24 MiB at 48 layers x 128
// experts x capacity 1000), and each request's matcher holds
// (Layers+2)·capacity float64s (400 KB at that shape).

// changeLogLen is how many collection changes a matcher can catch up on
// one entry at a time before it rebuilds from scratch.
const changeLogLen = 64

// maxPendingFactor bounds a matcher's pending deltas at
// maxPendingFactor·Layers·Experts; past it the matcher rebuilds instead.
const maxPendingFactor = 1

// delta is a change of one query count: position l*Experts+x and the
// exact difference new-old (exact in float64 for float32 counts).
type delta struct {
	pos int
	v   float64
}

// matcher is the incremental match state of one request's EAM q against a
// Collection. It is owned by the request (Tracker's live) and guarded by
// the request's lock; sync and match also need the collection's read lock.
type matcher struct {
	built   bool   // d, rowSq and p describe q against entries at version
	version uint64 // collection version the state is synced to
	n       int    // number of entries covered
	stride  int    // capacity: d[l*stride+i]
	d       []float64
	rowSq   []float64 // rowSq[l] = squared norm of q's row l
	cur     int       // p holds layers [0, cur]; -1 = p not valid
	p       []float64
	pending []delta // changes of q not yet applied to d
	sims    []float64
}

// observe records that q's count at pos changed from old to now.
func (mt *matcher) observe(pos int, old, now float32, limit int) {
	if !mt.built {
		return // the next sync rebuilds from q
	}
	if len(mt.pending) >= limit {
		mt.built, mt.pending = false, mt.pending[:0]
		return
	}
	mt.pending = append(mt.pending, delta{pos: pos, v: float64(now) - float64(old)})
}

// setColLocked copies entry i's counts into the transposed view cols. The
// caller holds c.mu for writing.
func (c *Collection) setColLocked(i int) {
	for pos, v := range c.entries[i].m.Counts {
		c.cols[pos*c.capacity+i] = v
	}
}

// rlockCols takes c.mu for reading with the transposed view cols built.
func (c *Collection) rlockCols() {
	c.mu.RLock()
	if c.cols != nil {
		return
	}
	c.mu.RUnlock()
	c.mu.Lock()
	if c.cols == nil {
		c.cols = make([]float32, c.layers*c.experts*c.capacity)
		for i := range c.entries {
			c.setColLocked(i)
		}
	}
	c.mu.Unlock()
	c.mu.RLock() // cols, once built, is never reset
}

// syncLocked brings mt up to date with q (whose changes since the last
// sync are mt.pending) and with c's entries. The caller holds c.mu for
// reading with c.cols built (rlockCols).
func (c *Collection) syncLocked(mt *matcher, q *EAM) {
	n := len(c.entries)
	if !mt.built || c.version-mt.version > changeLogLen || mt.stride != c.capacity {
		c.rebuildLocked(mt, q)
		return
	}
	E := c.experts
	nOld := mt.n
	for _, dl := range mt.pending {
		l := dl.pos / E
		col := c.cols[dl.pos*c.capacity : dl.pos*c.capacity+nOld]
		d := mt.d[l*mt.stride : l*mt.stride+nOld]
		v := dl.v
		if l <= mt.cur {
			p := mt.p[:nOld]
			for i, e := range col {
				t := v * float64(e)
				d[i] += t
				p[i] += t
			}
		} else {
			for i, e := range col {
				d[i] += v * float64(e)
			}
		}
	}
	last := -1
	for _, dl := range mt.pending {
		if l := dl.pos / E; l != last {
			mt.rowSq[l] = rowSqNorm(q.Row(l))
			last = l
		}
	}
	mt.pending = mt.pending[:0]
	// Entries changed since mt.version (replaced, or appended past nOld):
	// recompute their dot products from q.
	for v := mt.version + 1; v <= c.version; v++ {
		c.recomputeLocked(mt, q, c.changed[(v-1)%changeLogLen])
	}
	mt.n, mt.version = n, c.version
}

// rebuildLocked recomputes mt from q and all entries.
func (c *Collection) rebuildLocked(mt *matcher, q *EAM) {
	L, E, capa := c.layers, c.experts, c.capacity
	if mt.stride != capa || len(mt.d) != L*capa {
		mt.stride = capa
		mt.d = make([]float64, L*capa)
		mt.p = make([]float64, capa)
		mt.sims = make([]float64, capa)
		mt.rowSq = make([]float64, L)
	} else {
		clear(mt.d)
	}
	n := len(c.entries)
	for pos, v := range q.Counts {
		if v == 0 {
			continue
		}
		l := pos / E
		col := c.cols[pos*capa : pos*capa+n]
		d := mt.d[l*capa : l*capa+n]
		qv := float64(v)
		for i, e := range col {
			d[i] += qv * float64(e)
		}
	}
	for l := range L {
		mt.rowSq[l] = rowSqNorm(q.Row(l))
	}
	mt.pending = mt.pending[:0]
	mt.cur = -1
	mt.n, mt.version, mt.built = n, c.version, true
}

// recomputeLocked recomputes mt's dot products with entry i (and its
// prefix, if valid) from q.
func (c *Collection) recomputeLocked(mt *matcher, q *EAM, i int) {
	E := c.experts
	counts := c.entries[i].m.Counts
	for l := range c.layers {
		var s float64
		qr := q.Counts[l*E : (l+1)*E]
		er := counts[l*E : (l+1)*E]
		for x, v := range qr {
			if v != 0 {
				s += float64(v) * float64(er[x])
			}
		}
		mt.d[l*mt.stride+i] = s
	}
	if mt.cur >= 0 {
		var s float64
		for l := 0; l <= mt.cur; l++ {
			s += mt.d[l*mt.stride+i]
		}
		mt.p[i] = s
	}
}

// move makes mt.p hold layers [0, upto], stepping from the current
// prefix or summing afresh, whichever touches fewer layers.
func (mt *matcher) move(upto int) {
	n := mt.n
	p := mt.p[:n]
	if mt.cur < 0 || upto+1 <= abs(upto-mt.cur) {
		copy(p, mt.d[:n])
		for l := 1; l <= upto; l++ {
			addTo(p, mt.d[l*mt.stride:l*mt.stride+n])
		}
		mt.cur = upto
		return
	}
	for ; mt.cur < upto; mt.cur++ {
		l := mt.cur + 1
		addTo(p, mt.d[l*mt.stride:l*mt.stride+n])
	}
	for ; mt.cur > upto; mt.cur-- {
		l := mt.cur
		d := mt.d[l*mt.stride : l*mt.stride+n]
		for i, v := range d {
			p[i] -= v
		}
	}
}

// addTo adds src to dst element-wise (len(src) >= len(dst)).
func addTo(dst, src []float64) {
	src = src[:len(dst)]
	for i, v := range src {
		dst[i] += v
	}
}

func abs(x int) int {
	if x < 0 {
		return -x
	}
	return x
}

// matchIncLocked is matchLocked for the query q tracked by mt (see
// Collection.Match for the arguments and result). The caller holds c.mu
// for reading with cols built, and q's owner lock.
func (c *Collection) matchIncLocked(mt *matcher, q *EAM, upto, k int) []Match {
	if k <= 0 || len(c.entries) == 0 {
		return nil
	}
	if upto >= c.layers {
		upto = c.layers - 1
	}
	if upto < 0 {
		return nil
	}
	c.syncLocked(mt, q)
	mt.move(upto)
	var qn float64
	for l := 0; l <= upto; l++ {
		qn += mt.rowSq[l]
	}
	sims := mt.sims[:mt.n]
	for i := range sims {
		sims[i] = cosineFrom(mt.p[i], qn, c.entries[i].pn[upto])
	}
	return topMatches(sims, k)
}
