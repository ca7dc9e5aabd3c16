package backend

import (
	"testing"
	"time"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/dtype"
	"github.com/moe-infinity/moe_infinity/go/store"
)

// smallSource serves a smallLayer's experts (one layer) as host tensors.
type smallSource struct{ l *smallLayer }

func (s smallSource) SlotBytes() int64 { return int64(3 * slI * slH * 2) }
func (s smallSource) Fill(_, x int, dst []byte) error {
	copy(dst, unsafe.Slice((*byte)(unsafe.Pointer(&s.l.experts[x][0])), s.SlotBytes()))
	return nil
}
func (s smallSource) Guard(read func() error) error { return store.Guard(read) }
func (s smallSource) Segments(_, x int) ([]Segment, bool) {
	return []Segment{{Offset: 0, Data: unsafe.Slice((*byte)(unsafe.Pointer(&s.l.experts[x][0])), s.SlotBytes())}}, true
}
func (s smallSource) Shape() (int, int) { return 1, slE }

// handCapture opens a CPU backend over l in mapped mode and captures l's
// layer in copy mode with the hand-off on.
func handCapture(t *testing.T, l *smallLayer, timeout time.Duration) *CPU {
	t.Helper()
	c := NewCPU(1)
	c.CopyTimeout = timeout
	src := smallSource{l}
	require.NoError(t, c.Open(slE, src.SlotBytes(), src))
	t.Cleanup(func() { _ = c.Close() })
	const rows = slI * slH * 2
	require.NoError(t, c.EnableMapped(MappedLayout{Gate: 0, Up: rows, Down: 2 * rows, RowsBytes: rows, DownBytes: rows}))
	require.NoError(t, c.SetCopyMode(true))
	require.NoError(t, c.SetCopyHandOff(slT, slH))
	require.NoError(t, c.BeginCapture())
	a := l.args()
	a.GateUp, a.Down = nil, nil
	r, err := c.MappedFFN(0, a)
	require.NoError(t, err)
	require.Nil(t, r)
	layers, err := c.EndCapture()
	require.NoError(t, err)
	require.Len(t, layers, 1)
	return c
}

// The copy-mode hand-off's protocol on the CPU stand-in: a replayed layer
// publishes its routing, activations and weights; the engine writes the
// CPU's partial and names its experts, and the answer comes after both;
// the layer then skips those experts' pairs and adds the partial. A late
// answer is ignored: the layer read every expert from its table.
func TestCopyHandOffPublishesTheLayerAndHonoursOnlyATimelyAnswer(t *testing.T) {
	l := newSmallLayer()
	full := l.run(t, l.args())
	// The partial the test writes for expert 1: a constant that no sum of
	// expert 1's pairs would give, so that the output shows it was added.
	mark := make([]float32, slT*slH)
	for i := range mark {
		mark[i] = 8
	}
	skipped := l.args()
	skipped.GateUp[1], skipped.Down[1] = 0, 0
	skipped.Addend = addrOf(mark)
	want := l.run(t, skipped)
	require.NotEqual(t, full, want)

	for _, tc := range []struct {
		name string
		late bool
	}{{"answered in time", false}, {"answered late", true}} {
		t.Run(tc.name, func(t *testing.T) {
			timeout := time.Minute
			if tc.late {
				timeout = time.Millisecond
			}
			c := handCapture(t, l, timeout)
			clear(l.out)
			r, err := c.ReplayRouting(0, []CapturedLayer{{Layer: 0, Pairs: slT * slK, K: slK}})
			require.NoError(t, err)
			ids, seq, err := c.AwaitLayer(0, nil)
			require.NoError(t, err)
			assert.Equal(t, l.topk, ids)
			assert.Equal(t, uint64(1), seq)
			w, wdt, ok := c.LayerWork(0)
			require.True(t, ok)
			assert.Equal(t, dtype.F32, wdt)
			assert.Equal(t, l.x, unsafe.Slice((*uint16)(HostPtr(w.X)), slT*slH), "x is published")
			assert.Equal(t, l.wts, unsafe.Slice((*float32)(HostPtr(w.Weights)), slT*slK), "and the routing weights")
			if tc.late {
				_, err := r.Wait() // the layer ran without its answer
				require.NoError(t, err)
			}
			wrote := false
			err = c.ServeLayerCPU(0, seq, nil, []int32{1}, func() error {
				copy(unsafe.Slice((*float32)(HostPtr(w.Partial)), slT*slH), mark)
				wrote = true
				return nil
			})
			assert.True(t, wrote, "the partial is written before the answer")
			if tc.late {
				assert.ErrorIs(t, err, ErrLate)
			} else {
				require.NoError(t, err)
			}
			got, err := r.Wait()
			require.NoError(t, err)
			assert.Equal(t, l.topk, got)
			if tc.late {
				assert.Equal(t, full, l.out, "a late answer: every expert read in place, the partial ignored")
			} else {
				assert.Equal(t, want, l.out, "expert 1 skipped and the partial added")
			}
		})
	}
}

// A failed partial leaves the skip list empty: the layer reads the CPU's
// experts in place, and the error is returned.
func TestCopyHandOffWithAFailedPartialReadsEveryExpert(t *testing.T) {
	l := newSmallLayer()
	full := l.run(t, l.args())
	c := handCapture(t, l, time.Minute)
	clear(l.out)
	r, err := c.ReplayRouting(0, []CapturedLayer{{Layer: 0, Pairs: slT * slK, K: slK}})
	require.NoError(t, err)
	_, seq, err := c.AwaitLayer(0, nil)
	require.NoError(t, err)
	err = c.ServeLayerCPU(0, seq, nil, []int32{1}, func() error { return assert.AnError })
	assert.ErrorIs(t, err, assert.AnError)
	_, err = r.Wait()
	require.NoError(t, err)
	assert.Equal(t, full, l.out)
}

// Without the hand-off (SetCopyHandOff(0, 0)) a copy-mode capture has no
// mailbox, and replays publish the captured routing as before.
func TestCopyModeWithoutTheHandOffHasNoMailbox(t *testing.T) {
	l := newSmallLayer()
	c := handCapture(t, l, time.Minute)
	require.NoError(t, c.SetCopyHandOff(0, 0))
	require.NoError(t, c.BeginCapture())
	a := l.args()
	a.GateUp, a.Down = nil, nil
	_, err := c.MappedFFN(0, a)
	require.NoError(t, err)
	_, err = c.EndCapture()
	require.NoError(t, err)
	_, err = c.ReplayRouting(0, []CapturedLayer{{Layer: 0, Pairs: slT * slK, K: slK}})
	require.NoError(t, err)
	_, seq, err := c.AwaitLayer(0, nil)
	require.NoError(t, err)
	_, _, ok := c.LayerWork(0)
	assert.False(t, ok)
	require.NoError(t, c.ServeLayer(0, seq, nil))
	assert.Error(t, c.SetCopyHandOff(4, 0))
}
