package backend

import (
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/store"
)

// patternSource fills a slot with bytes derived from (layer, expert) and
// records the order of fills. gate, when set, blocks each fill until it
// receives a value.
type patternSource struct {
	size  int64
	gate  chan struct{}
	mu    sync.Mutex
	order [][2]int
	fail  map[[2]int]error
	boom  bool

	guards int // Guard calls
}

func (p *patternSource) SlotBytes() int64 { return p.size }

// Guard is store.Guard, counting its calls.
func (p *patternSource) Guard(read func() error) error {
	p.mu.Lock()
	p.guards++
	p.mu.Unlock()
	return store.Guard(read)
}
func (p *patternSource) Fill(layer, expert int, dst []byte) error {
	if p.gate != nil {
		<-p.gate
	}
	p.mu.Lock()
	p.order = append(p.order, [2]int{layer, expert})
	err := p.fail[[2]int{layer, expert}]
	p.mu.Unlock()
	if p.boom {
		panic("fill exploded")
	}
	if err != nil {
		return err
	}
	for i := range dst[:p.size] {
		dst[i] = byte(layer*31 + expert*7 + i)
	}
	return nil
}

func wantPattern(layer, expert int, n int64) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(layer*31 + expert*7 + i)
	}
	return b
}

func TestCPULoadFillsTheRightSlot(t *testing.T) {
	src := &patternSource{size: 100}
	b := NewCPU(2)
	require.Equal(t, "cpu", b.Name())
	require.NoError(t, b.Open(3, 128, src))
	defer b.Close()
	var ts []Transfer
	for s := 0; s < 3; s++ {
		ts = append(ts, b.Load(s, 1, s+4, s == 0))
	}
	for _, tr := range ts {
		<-tr.Done()
		require.NoError(t, tr.Err())
	}
	base, size := b.Arena()
	assert.Equal(t, int64(3*128), size)
	for s := 0; s < 3; s++ {
		assert.Equal(t, wantPattern(1, s+4, 100), b.SlotBytes(s)[:100])
		assert.Equal(t, base+uintptr(s*128), b.SlotAddr(s))
	}
	assert.Zero(t, b.SlotAddr(3))
	assert.Nil(t, b.SlotBytes(-1))
}

func TestCPUUrgentLoadsJumpTheQueue(t *testing.T) {
	src := &patternSource{size: 8, gate: make(chan struct{})}
	b := NewCPU(1)
	require.NoError(t, b.Open(8, 8, src))
	defer b.Close()
	first := b.Load(0, 0, 0, false) // occupies the only worker
	time.Sleep(10 * time.Millisecond)
	var prefetches []Transfer
	for e := 1; e <= 3; e++ {
		prefetches = append(prefetches, b.Load(e, 0, e, false))
	}
	demand := b.Load(7, 0, 7, true)
	close(src.gate)
	for _, tr := range append(prefetches, first, demand) {
		require.NoError(t, tr.Err())
	}
	src.mu.Lock()
	defer src.mu.Unlock()
	assert.Equal(t, [][2]int{{0, 0}, {0, 7}, {0, 1}, {0, 2}, {0, 3}}, src.order)
}

// With a modelled link, copies cross one at a time, each no sooner than
// its bytes at the link's rate plus the reaction after the previous one
// (four workers notwithstanding), and the link, once free, takes a demand
// load before queued prefetches.
func TestCPULinkModelCarriesOneCopyAtATimeAtItsRate(t *testing.T) {
	const slot = 200_000 // bytes: 20 ms at 0.01 GB/s, plus 5 ms of reaction
	link := LinkModel{GBps: 0.01, Reaction: 5 * time.Millisecond}
	require.Equal(t, 25*time.Millisecond, link.Duration(slot))
	src := &patternSource{size: slot}
	b := NewCPU(4)
	b.Link = link
	require.NoError(t, b.Open(8, slot, src))
	defer b.Close()

	start := time.Now()
	var ts []Transfer
	for e := range 4 {
		ts = append(ts, b.Load(e, 0, e, false))
	}
	demand := b.Load(7, 0, 7, true) // queued while the first copy holds the link (or before it took one)
	require.NoError(t, demand.Err())
	for _, tr := range ts {
		require.NoError(t, tr.Err())
	}
	assert.GreaterOrEqual(t, time.Since(start), 5*link.Duration(slot), "five copies, one at a time")
	src.mu.Lock()
	order := append([][2]int(nil), src.order...)
	src.mu.Unlock()
	require.Len(t, order, 5)
	assert.Contains(t, order[:2], [2]int{0, 7}, "the demand load crosses as soon as the link is free: %v", order)
	assert.Equal(t, [][2]int{{0, 1}, {0, 2}, {0, 3}}, order[2:], "then the prefetches, in order")
	assert.Equal(t, wantPattern(0, 3, slot), b.SlotBytes(3))
}

func TestCPUFillErrorsAndPanicsBecomeTransferErrors(t *testing.T) {
	boom := errors.New("read failed")
	src := &patternSource{size: 8, fail: map[[2]int]error{{0, 1}: boom}}
	b := NewCPU(1)
	require.NoError(t, b.Open(2, 8, src))
	require.ErrorIs(t, b.Load(0, 0, 1, true).Err(), boom)
	src.boom = true
	err := b.Load(1, 0, 2, true).Err()
	require.ErrorContains(t, err, "panic while filling slot 1 with L0/E2: fill exploded")
	require.ErrorContains(t, b.Load(5, 0, 0, true).Err(), "slot 5 out of range")
	require.NoError(t, b.Close())
}

func TestCPUOpenValidation(t *testing.T) {
	src := &patternSource{size: 8}
	require.ErrorContains(t, NewCPU(1).Open(0, 8, src), "at least one slot")
	require.ErrorContains(t, NewCPU(1).Open(1, 8, nil), "nil source")
	require.ErrorContains(t, NewCPU(1).Open(1<<30, 1<<30, src), "too large")
	b := NewCPU(0)
	require.ErrorContains(t, b.Load(0, 0, 0, true).Err(), "before Open")
	require.NoError(t, b.Open(1, 8, src))
	require.ErrorContains(t, b.Open(1, 8, src), "already opened")
	require.NoError(t, b.Close())
	require.ErrorIs(t, b.Open(1, 8, src), ErrClosed)
}

func TestCPUCloseFailsQueuedLoadsAndIsIdempotent(t *testing.T) {
	src := &patternSource{size: 8, gate: make(chan struct{})}
	b := NewCPU(1)
	require.NoError(t, b.Open(4, 8, src))
	running := b.Load(0, 0, 0, true)
	time.Sleep(10 * time.Millisecond)
	queued := b.Load(1, 0, 1, false)
	closed := make(chan error)
	go func() { closed <- b.Close() }()
	require.ErrorIs(t, queued.Err(), ErrClosed)
	close(src.gate)
	require.NoError(t, running.Err(), "a running copy completes")
	require.NoError(t, <-closed)
	require.NoError(t, b.Close())
	require.ErrorIs(t, b.Load(0, 0, 0, true).Err(), ErrClosed)
	addr, size := b.Arena()
	assert.Zero(t, addr)
	assert.Zero(t, size)
	assert.Zero(t, b.SlotAddr(0))
}

func TestFailedTransfer(t *testing.T) {
	e := errors.New("x")
	tr := Failed(e)
	<-tr.Done()
	assert.ErrorIs(t, tr.Err(), e)
}
