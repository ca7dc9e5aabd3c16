package engine

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"sync"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/backend"
	"github.com/moe-infinity/moe_infinity/go/dtype"
	"github.com/moe-infinity/moe_infinity/go/layout"
	"github.com/moe-infinity/moe_infinity/go/quant"
)

// The quantized test model: per-expert FP8 gate_proj and up_proj [qI, qH]
// and down_proj [qH, qI] with weight_block_size [2, 4], so that the
// intermediate size 3 leaves a partial block.
const (
	qH, qI = 8, 3
)

var qBlock = quant.Block{Rows: 2, Cols: 4}

var fp8Spec = layout.Spec{
	QuantMethod: "fp8", WeightBlockSize: []int64{2, 4},
	Regions: []layout.RegionSpec{
		{Name: "gate_up_proj", Parts: []string{"gate_proj.weight", "up_proj.weight"}, DType: "bfloat16"},
		{Name: "down_proj", Parts: []string{"down_proj.weight"}, DType: "bfloat16"},
	},
}

// qRole is the FP8 bytes and float32 scales of role r of expert (l, x):
// distinct for every expert, never an FP8 NaN code.
func qRole(l, x, r int, rows, cols int) (w, s []byte) {
	w = make([]byte, rows*cols)
	for i := range w {
		w[i] = byte(l*37+x*11+r*5+i) & 0x77
	}
	sr, sc := qBlock.ScaleGrid(rows, cols)
	s = make([]byte, 4*sr*sc)
	for i := 0; i < sr*sc; i++ {
		binary.LittleEndian.PutUint32(s[4*i:], math.Float32bits(float32(1+l)*0.125+float32(x)*0.5+float32(r+i)*0.03125))
	}
	return w, s
}

var qRoles = []struct {
	name       string
	rows, cols int
}{{"gate_proj", qI, qH}, {"up_proj", qI, qH}, {"down_proj", qH, qI}}

func quantModel(t *testing.T, e *Engine, L, E int) {
	t.Helper()
	for l := 0; l < L; l++ {
		for x := 0; x < E; x++ {
			for r, ro := range qRoles {
				w, s := qRole(l, x, r, ro.rows, ro.cols)
				sr, sc := qBlock.ScaleGrid(ro.rows, ro.cols)
				p := fmt.Sprintf("model.layers.%d.mlp.experts.%d.%s.", l, x, ro.name)
				require.NoError(t, e.AddHostTensor(p+"weight", "F8_E4M3", []int64{int64(ro.rows), int64(ro.cols)}, w))
				require.NoError(t, e.AddHostTensor(p+"weight_scale_inv", "F32", []int64{int64(sr), int64(sc)}, s))
			}
		}
	}
}

// wantView is expert (l, x)'s view image, dequantized role by role.
func wantView(t *testing.T, l, x int) (gateUp, down []byte) {
	for r, ro := range qRoles {
		w, s := qRole(l, x, r, ro.rows, ro.cols)
		out := make([]byte, 2*ro.rows*ro.cols)
		require.NoError(t, quant.DequantFP8Block(out, dtype.BF16, w, s, dtype.F32, ro.rows, ro.cols, qBlock))
		if r < 2 {
			gateUp = append(gateUp, out...)
		} else {
			down = out
		}
	}
	return gateUp, down
}

func newQuantEngine(t *testing.T, cfg Config, L, E int) (*Engine, Plan) {
	t.Helper()
	e, err := New(cfg)
	require.NoError(t, err)
	quantModel(t, e, L, E)
	p, err := e.Configure(Setup{Layout: fp8Spec, FFN: "swiglu"})
	require.NoError(t, err)
	t.Cleanup(func() { _ = e.Close() })
	return e, p
}

// quantBudget is the budget that gives views views and slots slots (the
// test model's slot is 3 views big, so views = slots splits it as
// viewBudget does).
func quantBudget(t *testing.T, views, slots int) int64 {
	t.Helper()
	e, p := newQuantEngine(t, Config{BudgetBytes: 1 << 20, Prefetch: noPrefetch()}, 1, 1)
	require.NoError(t, e.Close())
	return int64(views)*p.Views.Bytes + int64(slots)*p.SlotBytes
}

// viewBytes is view v's memory (CPU memory on the CPU backend).
func viewBytes(t *testing.T, e *Engine, v int) []byte {
	t.Helper()
	addr, err := e.SlotAddr(v)
	require.NoError(t, err)
	ptr := *(*unsafe.Pointer)(unsafe.Pointer(&addr)) // vet: addr is memory the backend mapped
	return unsafe.Slice((*byte)(ptr), e.plan.Views.Bytes)
}

// checkView asserts that view v holds expert (l, x) dequantized.
func checkView(t *testing.T, e *Engine, p Plan, v int, l, x int) {
	t.Helper()
	gu, _ := p.Layout.Region("gate_up_proj")
	dn, _ := p.Layout.Region("down_proj")
	b := viewBytes(t, e, v)
	wantGU, wantDn := wantView(t, l, x)
	require.Equal(t, wantGU, b[gu.Offset:gu.Offset+gu.Bytes], "gate_up_proj of expert (%d, %d) in view %d", l, x, v)
	require.Equal(t, wantDn, b[dn.Offset:dn.Offset+dn.Bytes], "down_proj of expert (%d, %d) in view %d", l, x, v)
}

func TestQuantizedPlanKeepsTheCheckpointBytesInSlotsAndViewsForTheCaller(t *testing.T) {
	e, p := newQuantEngine(t, Config{BudgetBytes: 1 << 20, Prefetch: noPrefetch(), CPUExperts: 1}, 2, 4)
	require.NotNil(t, p.Stored)
	assert.Equal(t, int64(3*qI*qH+3*4*4), p.Stored.SourceBytes, "FP8 values and their float32 scales")
	assert.Equal(t, p.Stored.SlotBytes, p.SlotBytes, "the cache's slots hold the stored image")
	gu, _ := p.Layout.Region("gate_up_proj")
	assert.Equal(t, []int64{2 * qI, qH}, gu.Shape)
	assert.Equal(t, "bfloat16", gu.DType)
	assert.Equal(t, ViewsPlan{Count: 8, Bytes: p.Layout.SlotBytes, Dequant: "fp8"}, p.Views, "one view per expert of this small model")
	assert.Equal(t, 8, e.MaxPin())
	assert.False(t, p.Executor.Kernels)
	assert.Contains(t, p.Executor.KernelsOff, "quantized")
	addr, size, err := e.Arena()
	require.NoError(t, err)
	assert.Equal(t, int64(8)*p.Views.Bytes, size, "the arena the caller views is the views'")
	a1, err := e.SlotAddr(1)
	require.NoError(t, err)
	assert.Equal(t, addr+uintptr(p.Views.Bytes), a1)
}

func TestQuantizedAcquireHandsOutDequantizedViews(t *testing.T) {
	e, p := newQuantEngine(t, Config{BudgetBytes: 1 << 20, Prefetch: noPrefetch()}, 2, 4)
	slots := make([]int32, 3)
	lease, err := e.Acquire(1, []int32{3, 0, 3}, slots, 0)
	require.NoError(t, err)
	assert.Equal(t, slots[0], slots[2], "duplicates share one view")
	checkView(t, e, p, int(slots[0]), 1, 3)
	checkView(t, e, p, int(slots[1]), 1, 0)
	require.NoError(t, e.Release(lease, 0))

	again := acquire(t, e, 1, 3)
	assert.Equal(t, slots[0], again[0], "a released view keeps its expert for the next use")
	checkView(t, e, p, int(again[0]), 1, 3)
	st, err := e.Stats()
	require.NoError(t, err)
	assert.Equal(t, uint64(2), st.Misses, "the cache counts uses of the stored experts")
}

func TestQuantizedViewsAreReusedLeastRecentFirstWhenTheyRunOut(t *testing.T) {
	// 4 views and 4 slots: 2 layers × 4 experts cycle through both.
	e, p := newQuantEngine(t, Config{BudgetBytes: quantBudget(t, 4, 4), Prefetch: noPrefetch()}, 2, 4)
	require.Equal(t, 4, p.Views.Count)
	require.Equal(t, 4, p.Slots)
	for round := 0; round < 3; round++ {
		for l := 0; l < 2; l++ {
			for x := int32(0); x < 4; x++ {
				v := acquire(t, e, l, x)
				checkView(t, e, p, int(v[0]), l, int(x))
			}
		}
	}
	slots := make([]int32, 5)
	lease, err := e.Acquire(0, []int32{0, 1, 2, 3, 0}, slots, 0)
	require.NoError(t, err, "4 distinct experts fit 4 views")
	for i, x := range []int{0, 1, 2, 3, 0} {
		checkView(t, e, p, int(slots[i]), 0, x)
	}
	require.NoError(t, e.Release(lease, 0))
}

func TestQuantizedAcquireOfMoreExpertsThanViewsIsABudgetError(t *testing.T) {
	e, p := newQuantEngine(t, Config{BudgetBytes: quantBudget(t, 2, 2), Prefetch: noPrefetch()}, 2, 4)
	require.Equal(t, 2, p.Views.Count)
	assert.Equal(t, 2, e.MaxPin())
	_, err := e.Acquire(0, []int32{0, 1, 2}, make([]int32, 3), 0)
	require.ErrorIs(t, err, ErrBudget)
	assert.Contains(t, err.Error(), "acquire at most 2 experts")
	assert.Zero(t, e.Leases())
	checkView(t, e, p, int(acquire(t, e, 0, 2)[0]), 0, 2)
}

func TestQuantizedBudgetAndBackendErrors(t *testing.T) {
	e, err := New(Config{BudgetBytes: quantBudget(t, 1, 1) - 1})
	require.NoError(t, err)
	defer e.Close()
	quantModel(t, e, 1, 2)
	_, err = e.Configure(Setup{Layout: fp8Spec})
	require.ErrorIs(t, err, ErrBudget)
	assert.Contains(t, err.Error(), "dequantized view")

	e, err = New(Config{BudgetBytes: 1 << 20})
	require.NoError(t, err)
	defer e.Close()
	// A backend with no view memory (only backend.Backend's methods).
	e.NewBackend = func(cfg Config) (backend.Backend, error) {
		return struct{ backend.Backend }{backend.NewCPU(cfg.Workers)}, nil
	}
	quantModel(t, e, 1, 2)
	_, err = e.Configure(Setup{Layout: fp8Spec})
	require.ErrorIs(t, err, ErrUnsupported)
	assert.Contains(t, err.Error(), "cannot hold")

	e, err = New(Config{BudgetBytes: 1 << 20})
	require.NoError(t, err)
	defer e.Close()
	quantModel(t, e, 1, 2)
	spec := fp8Spec
	spec.WeightBlockSize = []int64{128, 128}
	_, err = e.Configure(Setup{Layout: spec})
	require.Error(t, err)
	assert.Contains(t, err.Error(), "weight_block_size [128, 128]")
}

func TestQuantizedConcurrentAcquiresSeeTheirOwnExperts(t *testing.T) {
	e, p := newQuantEngine(t, Config{BudgetBytes: quantBudget(t, 6, 6)}, 3, 6)
	require.Equal(t, 6, p.Views.Count)
	var wg sync.WaitGroup
	for g := 0; g < 6; g++ {
		wg.Add(1)
		go func(seed uint64) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(seed, 1))
			for i := 0; i < 60; i++ {
				l := rng.IntN(3)
				xs := []int32{int32(rng.IntN(6)), int32(rng.IntN(6))}
				slots := make([]int32, 2)
				lease, err := e.Acquire(l, xs, slots, 0)
				if !assert.NoError(t, err) {
					return
				}
				for j, x := range xs {
					checkView(t, e, p, int(slots[j]), l, int(x))
				}
				assert.NoError(t, e.Release(lease, 0))
			}
		}(uint64(g))
	}
	wg.Wait()
	assert.Zero(t, e.Leases())
}

func TestQuantizedCloseWakesAnAcquireWaitingForViews(t *testing.T) {
	e, err := New(Config{BudgetBytes: quantBudget(t, 1, 1), Prefetch: noPrefetch()})
	require.NoError(t, err)
	quantModel(t, e, 1, 4)
	_, err = e.Configure(Setup{Layout: fp8Spec})
	require.NoError(t, err)
	held, err := e.Acquire(0, []int32{0}, make([]int32, 1), 0)
	require.NoError(t, err)
	done := make(chan error, 1)
	go func() {
		_, err := e.Acquire(0, []int32{1}, make([]int32, 1), 0)
		done <- err
	}()
	closed := make(chan error, 1)
	go func() { closed <- e.Close() }()
	err = <-done
	assert.True(t, errors.Is(err, ErrClosed), "got %v", err)
	require.NoError(t, e.Release(held, 0))
	require.NoError(t, <-closed)
}
