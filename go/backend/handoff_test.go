package backend

import (
	"math"
	"math/rand/v2"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/dtype"
)

func addrOf[T any](s []T) uint64 { return uint64(uintptr(unsafe.Pointer(&s[0]))) }

// smallLayer is a bfloat16 layer of E experts in Go memory: T = 3 tokens,
// K = 2, every expert used.
type smallLayer struct {
	x, out  []uint16
	experts [][]uint16 // gate, up, down of each expert
	topk    []int64
	wts     []float32
	scratch []float32
}

const slH, slI, slE, slT, slK = 24, 16, 3, 3, 2

func newSmallLayer() *smallLayer {
	rng := rand.New(rand.NewPCG(11, 12))
	bf := func(v float32) uint16 { return dtype.F32BitsToBF16(math.Float32bits(v)) }
	l := &smallLayer{
		x: make([]uint16, slT*slH), out: make([]uint16, slT*slH), scratch: make([]float32, slT*slK*slI),
		topk: []int64{0, 1, 1, 2, 2, 0}, wts: []float32{0.6, 0.4, 0.3, 0.7, 0.5, 0.5},
	}
	for i := range l.x {
		l.x[i] = bf(rng.Float32()*2 - 1)
	}
	for range slE {
		w := make([]uint16, 3*slI*slH)
		for i := range w {
			w[i] = bf((rng.Float32()*2 - 1) * 0.3)
		}
		l.experts = append(l.experts, w)
	}
	return l
}

// args are l's FFN arguments with every expert in the tables.
func (l *smallLayer) args() FFNArgs {
	a := FFNArgs{
		X: addrOf(l.x), Out: addrOf(l.out), Scratch: addrOf(l.scratch), TopK: addrOf(l.topk), Weights: addrOf(l.wts),
		T: slT, K: slK, Hidden: slH, Inter: slI, DType: dtype.BF16, WDType: dtype.F32,
	}
	for _, w := range l.experts {
		a.GateUp = append(a.GateUp, addrOf(w))
		a.Down = append(a.Down, addrOf(w)+uint64(2*slI*slH*2))
	}
	return a
}

// run computes a with the reference FFN and returns its output.
func (l *smallLayer) run(t *testing.T, a FFNArgs) []uint16 {
	t.Helper()
	require.NoError(t, NewCPU(1).ReferenceFFN(a))
	return append([]uint16(nil), l.out...)
}

// The reference FFN is the oracle of every backend's kernels: a null table
// entry skips its pairs (hybrid execution leaves the CPU's experts null)
// and Addend joins each token's sum before the one rounding.
func TestReferenceFFNSkipsNullEntriesAndAddsTheAddend(t *testing.T) {
	l := newSmallLayer()
	full := l.run(t, l.args())
	addend := make([]float32, slT*slH)
	for i := range addend {
		addend[i] = float32(i%7) * 0.125
	}
	zeros := make([]float32, slT*slH)

	// Expert 1 null against its pairs routed nowhere (ids outside the
	// tables, skipped): the same output, bit for bit.
	a := l.args()
	a.GateUp[1], a.Down[1] = 0, 0
	nulled := l.run(t, a)
	b := l.args()
	topk := append([]int64(nil), l.topk...)
	topk[1], topk[2] = -1, -1
	b.TopK, b.SkipInvalid = addrOf(topk), true
	assert.Equal(t, l.run(t, b), nulled, "a null entry skips its pairs")
	assert.NotEqual(t, full, nulled, "and they did contribute")

	// Every entry null: the output is the addend, rounded.
	a = l.args()
	for e := range a.GateUp {
		a.GateUp[e], a.Down[e] = 0, 0
	}
	a.Addend = addrOf(addend)
	got := l.run(t, a)
	for i, v := range addend {
		assert.Equal(t, dtype.F32BitsToBF16(math.Float32bits(v)), got[i], "element %d", i)
	}
	for i := range l.scratch {
		assert.Zero(t, l.scratch[i], "skipped pairs have h = 0")
	}

	// A zero addend changes nothing; another one changes the output.
	a = l.args()
	a.Addend = addrOf(zeros)
	assert.Equal(t, full, l.run(t, a))
	a.Addend = addrOf(addend)
	assert.NotEqual(t, full, l.run(t, a))
}

func TestReferenceFFNRejectsPairsItCannotCompute(t *testing.T) {
	for _, tc := range []struct {
		name string
		mod  func(a *FFNArgs, topk []int64)
		err  string
	}{
		{"an id outside the tables", func(a *FFNArgs, topk []int64) { topk[3] = slE }, "outside the tables"},
		{"gate rows without down rows", func(a *FFNArgs, _ []int64) { a.Down[2] = 0 }, "incomplete"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := newSmallLayer()
			a := l.args()
			topk := append([]int64(nil), l.topk...)
			a.TopK = addrOf(topk)
			tc.mod(&a, topk)
			assert.ErrorContains(t, NewCPU(1).ReferenceFFN(a), tc.err)
			a.SkipInvalid = true
			assert.NoError(t, NewCPU(1).ReferenceFFN(a), "SkipInvalid skips the pair")
		})
	}
}

// The CPU backend's hand-off copies nothing: the activations and weights
// are where the kernels read them, and the partial output is read where
// the CPU wrote it.
func TestCPUHandOffIsHostMemoryAlready(t *testing.T) {
	c := NewCPU(1)
	var ho HandOff = c
	w, err := ho.HandOut(0, 1234, 64, 5678, 16, 3*4)
	require.NoError(t, err)
	assert.Equal(t, uint64(1234), w.X)
	assert.Equal(t, uint64(5678), w.Weights)
	require.NotZero(t, w.Partial)
	part := unsafe.Slice((*float32)(HostPtr(w.Partial)), 3)
	part[2] = 2.5
	addend, err := ho.HandBack(0, 0)
	require.NoError(t, err)
	assert.Equal(t, w.Partial, addend)
	assert.Equal(t, float32(2.5), unsafe.Slice((*float32)(HostPtr(addend)), 3)[2])
	require.NoError(t, ho.HandDone(0))
	// Into the caller's buffer (the host paths' partial output): copied.
	into := make([]float32, 3)
	got, err := ho.HandBack(0, uint64(uintptr(unsafe.Pointer(&into[0]))))
	require.NoError(t, err)
	assert.Equal(t, uint64(uintptr(unsafe.Pointer(&into[0]))), got)
	assert.Equal(t, []float32{0, 0, 2.5}, into)
	assert.Zero(t, ho.HandOffFixedUs(LinkRates{DMAGBps: 50, ZeroCopyGBps: 50, ReactionUs: 20}))

	// A larger partial gets a larger buffer.
	w2, err := ho.HandOut(0, 1, 2, 3, 4, 1<<12)
	require.NoError(t, err)
	unsafe.Slice((*float32)(HostPtr(w2.Partial)), 1<<10)[1023] = 1
}
