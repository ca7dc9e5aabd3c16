package engine

import (
	"encoding/binary"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/backend"
	"github.com/moe-infinity/moe_infinity/go/cache"
	"github.com/moe-infinity/moe_infinity/go/layout"
)

const (
	tH = 4 // hidden
	tI = 3 // intermediate
)

// value is the f32 stored at element i of role r of expert (l, x).
func value(l, x, r, i int) float32 { return float32(l*1000 + x*100 + r*10 + i) }

// model registers a Mixtral-style per-expert model of L layers × E experts
// (w1, w2, w3 in f32) as host tensors (hostModel, its buffers not kept).
func model(t *testing.T, e *Engine, L, E int) {
	t.Helper()
	hostModel(t, e, L, E)
}

var mixtralSpec = layout.Spec{Regions: []layout.RegionSpec{
	{Name: "gate_up_proj", Parts: []string{"w1.weight", "w3.weight"}},
	{Name: "down_proj", Parts: []string{"w2.weight"}},
}}

// slotBytes is the slot size of the test model: 2·3·4 + 4·3 floats,
// each region aligned to 256 bytes.
const slotBytes = 256 + 256

func newEngine(t *testing.T, cfg Config, L, E int) (*Engine, Plan) {
	t.Helper()
	e, err := New(cfg)
	require.NoError(t, err)
	model(t, e, L, E)
	p, err := e.Configure(Setup{Layout: mixtralSpec})
	require.NoError(t, err)
	t.Cleanup(func() { _ = e.Close() })
	return e, p
}

func noPrefetch() *bool { f := false; return &f }

// slotFloats reads the slot's first region back as floats.
func slotFloats(t *testing.T, e *Engine, slot int, n int) []float32 {
	cpu, ok := e.be.(*backend.CPU)
	require.True(t, ok)
	b := cpu.SlotBytes(slot)
	out := make([]float32, n)
	for i := range out {
		out[i] = math.Float32frombits(binary.LittleEndian.Uint32(b[4*i:]))
	}
	return out
}

func acquire(t *testing.T, e *Engine, layer int, experts ...int32) []int32 {
	t.Helper()
	slots := make([]int32, len(experts))
	lease, err := e.Acquire(layer, experts, slots, 0)
	require.NoError(t, err)
	require.NoError(t, e.Release(lease, 0))
	return slots
}

func TestConfigureSizesTheCacheFromTheBudget(t *testing.T) {
	for _, tc := range []struct {
		name   string
		budget int64
		max    int
		slots  int
	}{
		{"exactly two slots", 2 * slotBytes, 0, 2},
		{"rounds down", 3*slotBytes - 1, 0, 2},
		{"capped at the model's expert count", 1 << 30, 0, 2 * 4},
		{"capped by max_slots", 1 << 30, 3, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, p := newEngine(t, Config{BudgetBytes: tc.budget, MaxSlots: tc.max}, 2, 4)
			assert.Equal(t, tc.slots, p.Slots)
			assert.Equal(t, int64(slotBytes), p.SlotBytes)
			assert.Equal(t, int64(tc.slots*slotBytes), p.ArenaBytes)
			assert.Equal(t, []string{"model.layers.0.block_sparse_moe", "model.layers.1.block_sparse_moe"}, p.Layers)
			assert.Equal(t, 4, p.NumExperts)
			assert.Equal(t, "cpu", p.Backend)
			assert.Equal(t, "priority", p.Policy)
			assert.True(t, p.Prefetch)
			require.Len(t, p.Layout.Regions, 2)
			assert.Equal(t, []int64{2 * tI, tH}, p.Layout.Regions[0].Shape)
		})
	}
}

func TestBudgetBelowOneExpertSaysHowMuchIsNeeded(t *testing.T) {
	e, err := New(Config{BudgetBytes: 100})
	require.NoError(t, err)
	defer e.Close()
	model(t, e, 1, 2)
	_, err = e.Configure(Setup{Layout: mixtralSpec})
	require.ErrorIs(t, err, ErrBudget)
	assert.Contains(t, err.Error(), "holds no expert: one expert slot needs 512 B (512 bytes)")
}

func TestAcquireCopiesTheExpertIntoItsSlot(t *testing.T) {
	e, _ := newEngine(t, Config{BudgetBytes: 2 * slotBytes, Prefetch: noPrefetch()}, 2, 4)
	slots := acquire(t, e, 1, 2, 3)
	// Region gate_up = w1 then w3 (each 3×4), at offset 0.
	got := slotFloats(t, e, int(slots[0]), 2*tI*tH)
	for i := 0; i < tI*tH; i++ {
		assert.Equal(t, value(1, 2, 0, i), got[i], "w1[%d]", i)
		assert.Equal(t, value(1, 2, 2, i), got[tI*tH+i], "w3[%d]", i)
	}
	st, err := e.Stats()
	require.NoError(t, err)
	assert.Equal(t, uint64(2), st.Misses)
	assert.Equal(t, int64(2*slotBytes), st.BytesMoved)
	assert.Equal(t, int64(2*slotBytes), st.Layers[1].BytesMoved)
	assert.Equal(t, int64(1), st.Acquires)
}

func TestHitsPlusMissesEqualUsesAndWarmCacheHasNoMisses(t *testing.T) {
	const L, E = 3, 4
	e, _ := newEngine(t, Config{BudgetBytes: L * E * slotBytes, Prefetch: noPrefetch()}, L, E)
	uses := 0
	for round := 0; round < 3; round++ {
		if round == 1 {
			require.NoError(t, e.ResetStats())
			uses = 0
		}
		for l := 0; l < L; l++ {
			acquire(t, e, l, 0, 1, 2, 3, 1) // duplicate expert shares a slot
			uses += 4
		}
	}
	st, err := e.Stats()
	require.NoError(t, err)
	assert.Equal(t, uint64(uses), st.Hits+st.Misses)
	assert.Zero(t, st.Misses, "with every expert cached there are no misses after warm-up")
	assert.Equal(t, L*E, st.Resident)
}

func TestAcquireMoreExpertsThanSlotsIsABudgetError(t *testing.T) {
	e, _ := newEngine(t, Config{BudgetBytes: 2 * slotBytes}, 1, 4)
	_, err := e.Acquire(0, []int32{0, 1, 2}, make([]int32, 3), 0)
	require.ErrorIs(t, err, ErrBudget)
	assert.Contains(t, err.Error(), "acquire at most 2 experts at a time")
	// Streaming them through in chunks works.
	for _, x := range []int32{0, 1, 2, 3} {
		acquire(t, e, 0, x)
	}
}

func TestInvalidArguments(t *testing.T) {
	e, _ := newEngine(t, Config{BudgetBytes: 4 * slotBytes}, 2, 4)
	for _, tc := range []struct {
		name string
		err  error
		msg  string
	}{
		{"layer", func() error { _, err := e.Acquire(5, []int32{0}, make([]int32, 1), 0); return err }(), "layer 5 out of range [0, 2)"},
		{"expert", func() error { _, err := e.Acquire(0, []int32{9}, make([]int32, 1), 0); return err }(), "expert 9 out of range [0, 4) in layer 0"},
		{"slots buffer", func() error { _, err := e.Acquire(0, []int32{1, 2}, make([]int32, 1), 0); return err }(), "slot buffer of 1 for 2 experts"},
		{"lease", e.Release(12345, 0), "unknown or already released lease 12345"},
		{"observe layer", e.Observe(-1, nil, nil), "layer -1 out of range"},
		{"observe rows", e.Observe(0, []uint64{1}, nil), "1 requests but 0 count rows"},
		{"observe request", e.Observe(0, []uint64{99}, [][]float32{make([]float32, 4)}), "unknown request"},
		{"end request", e.EndRequest(99), "unknown request"},
		{"hint", e.Hint(0, []int32{-1}), "expert -1 out of range"},
		{"slot addr", func() error { _, err := e.SlotAddr(4); return err }(), "slot 4 out of range [0, 4)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			require.ErrorIs(t, tc.err, ErrInvalid)
			assert.Contains(t, tc.err.Error(), tc.msg)
		})
	}
}

func TestCallOrderIsChecked(t *testing.T) {
	e, err := New(Config{BudgetBytes: 1 << 20})
	require.NoError(t, err)
	_, err = e.Acquire(0, nil, nil, 0)
	require.ErrorIs(t, err, ErrState)
	_, err = e.Configure(Setup{Layout: mixtralSpec})
	require.ErrorIs(t, err, ErrInvalid, "no experts registered")
	model(t, e, 1, 2)
	_, err = e.Configure(Setup{Layers: []string{"nope"}, Layout: mixtralSpec})
	require.ErrorContains(t, err, `no MoE module "nope"`)
	_, err = e.Configure(Setup{Layout: layout.Spec{Regions: []layout.RegionSpec{{Name: "x", Parts: []string{"w9.weight"}}}}})
	require.ErrorIs(t, err, ErrInvalid)
	_, err = e.Configure(Setup{Layout: mixtralSpec})
	require.NoError(t, err)
	_, err = e.Configure(Setup{Layout: mixtralSpec})
	require.ErrorIs(t, err, ErrState)
	require.ErrorIs(t, e.AddHostTensor("a", "F32", []int64{1}, make([]byte, 4)), ErrState)
	require.ErrorIs(t, e.AddCheckpoint("/nonexistent"), ErrState)
	require.NoError(t, e.Close())
	require.NoError(t, e.Close())
	_, err = e.Acquire(0, []int32{0}, make([]int32, 1), 0)
	require.ErrorIs(t, err, ErrClosed)
	_, err = e.Stats()
	require.ErrorIs(t, err, ErrClosed)
	require.ErrorIs(t, e.AddHostTensor("a", "F32", []int64{1}, make([]byte, 4)), ErrClosed)
	assert.True(t, e.Closed())
}

func TestParseConfig(t *testing.T) {
	c, err := ParseConfig([]byte(`{"budget_bytes": 1024}`))
	require.NoError(t, err)
	assert.Equal(t, "priority", c.Policy)
	assert.True(t, *c.Prefetch)
	assert.Equal(t, 1000, c.EAMCCapacity)
	assert.Equal(t, "cpu", c.Backend)
	assert.Equal(t, DefaultAdmitMargin, *c.AdmitMargin)
	for _, tc := range []struct{ in, msg string }{
		{`{"budget_bytes": 0}`, "budget_bytes must be > 0"},
		{`{"budget_bytes": 1, "policy": "fifo"}`, `unknown cache policy "fifo"`},
		{`{"budget_bytes": 1, "bogus": 1}`, `unknown key "bogus" (valid keys: admit_margin,`},
		{`{"budget_bytes": 1, "eamc_capacity": -1}`, "eamc_capacity must be >= 1"},
		{`{"budget_bytes": 1, "matches": -2}`, "matches must be >= 1"},
		{`{"budget_bytes": 1, "prefetch_window": -1}`, "prefetch_window must be >= 1"},
		{`{"budget_bytes": 1, "workers": -1}`, "workers must be >= 0"},
		{`{"budget_bytes": 1, "max_slots": -1}`, "max_slots must be >= 0"},
		{`{"budget_bytes": 1, "admit_margin": -0.5}`, "admit_margin must be a finite number >= 0"},
		{`[`, "engine config"},
	} {
		_, err := ParseConfig([]byte(tc.in))
		require.ErrorIs(t, err, ErrInvalid, tc.in)
		assert.Contains(t, err.Error(), tc.msg)
	}
	_, err = New(Config{BudgetBytes: 1, Backend: "tpu"})
	require.ErrorIs(t, err, ErrInvalid)
	require.ErrorContains(t, err, `backend: unknown backend "tpu" (supported: cpu, cuda)`)
	s, err := ParseSetup([]byte(`{"layers": ["a"], "layout": {"regions": [{"name": "r", "parts": ["p"]}]}}`))
	require.NoError(t, err)
	assert.Equal(t, []string{"a"}, s.Layers)
	_, err = ParseSetup([]byte(`{"layer": []}`))
	require.ErrorIs(t, err, ErrInvalid)
}

func TestFormatBytes(t *testing.T) {
	for n, want := range map[int64]string{
		512: "512 B", 1536: "1.50 KiB", 24 << 30: "24.00 GiB", 3 << 40: "3.00 TiB",
	} {
		assert.Equal(t, want, FormatBytes(n))
	}
}

// waitIdle waits until the prefetch queue is drained and nothing loads.
func waitIdle(t *testing.T, e *Engine) {
	t.Helper()
	require.Eventually(t, e.PrefetchIdle, 5*time.Second, time.Millisecond)
}

// runRequest traces one request that routes to experts[l] in layer l,
// acquiring each layer's experts.
func runRequest(t *testing.T, e *Engine, experts [][]int32, wait bool) {
	t.Helper()
	req, err := e.BeginRequest()
	require.NoError(t, err)
	for l, xs := range experts {
		counts := make([]float32, e.experts)
		for _, x := range xs {
			counts[x]++
		}
		require.NoError(t, e.Observe(l, []uint64{req}, [][]float32{counts}))
		if wait {
			waitIdle(t, e)
		}
		acquire(t, e, l, xs...)
	}
	require.NoError(t, e.EndRequest(req))
}

func TestTracePrefetchTurnsMissesIntoPrefetchHits(t *testing.T) {
	const L, E = 4, 8
	// One-token requests: the evidence filter would (rightly) ignore them.
	e, _ := newEngine(t, Config{BudgetBytes: 6 * slotBytes, PrefetchMinEvidence: -1}, L, E)
	pattern := [][]int32{{1, 2}, {3, 4}, {5, 6}, {7, 0}}
	runRequest(t, e, pattern, false) // records the EAM
	require.NoError(t, e.ResetStats())
	other := [][]int32{{0, 7}, {0, 7}, {0, 7}, {1, 2}} // evict the pattern's later layers
	runRequest(t, e, other, false)
	require.NoError(t, e.ResetStats())

	runRequest(t, e, pattern, true)
	st, err := e.Stats()
	require.NoError(t, err)
	assert.Equal(t, uint64(8), st.Hits+st.Misses)
	assert.GreaterOrEqual(t, st.PrefetchHits, uint64(4), "layers 1..3 were predicted from layer 0: %+v", st.LayerStats)
	assert.Equal(t, 3, st.EAMCSize)
}

func TestNoPrefetchMeansNoPrefetchLoads(t *testing.T) {
	e, _ := newEngine(t, Config{BudgetBytes: 6 * slotBytes, Prefetch: noPrefetch()}, 4, 8)
	pattern := [][]int32{{1, 2}, {3, 4}, {5, 6}, {7, 0}}
	runRequest(t, e, pattern, false)
	runRequest(t, e, pattern, false)
	st, _ := e.Stats()
	assert.Zero(t, st.PrefetchLoads)
	assert.Zero(t, st.PrefetchHits)
	require.NoError(t, e.Hint(1, []int32{1}))
}

func TestRouterHintPrefetches(t *testing.T) {
	e, _ := newEngine(t, Config{BudgetBytes: 4 * slotBytes}, 2, 4)
	require.NoError(t, e.Hint(1, []int32{2, 3}))
	waitIdle(t, e)
	slots := acquire(t, e, 1, 2, 3)
	assert.Len(t, slots, 2)
	st, _ := e.Stats()
	assert.Equal(t, uint64(2), st.PrefetchHits)
	assert.Equal(t, uint64(2), st.PrefetchLoads)
}

func TestTraceFilePersistsAcrossEngines(t *testing.T) {
	path := filepath.Join(t.TempDir(), "trace.bin")
	e, p := newEngine(t, Config{BudgetBytes: 4 * slotBytes, TracePath: path}, 2, 4)
	assert.Zero(t, p.TraceLoaded)
	runRequest(t, e, [][]int32{{0, 1}, {2, 3}}, false)
	require.NoError(t, e.Close())

	e2, p2 := newEngine(t, Config{BudgetBytes: 4 * slotBytes, TracePath: path}, 2, 4)
	assert.Equal(t, 1, p2.TraceLoaded)
	assert.Empty(t, p2.Warnings)
	st, _ := e2.Stats()
	assert.Equal(t, 1, st.EAMCSize)
	require.NoError(t, e2.SaveTrace(filepath.Join(t.TempDir(), "copy.bin")))

	// A trace recorded for another model shape is reported and ignored.
	_, p3 := newEngine(t, Config{BudgetBytes: 4 * slotBytes, TracePath: path}, 3, 4)
	assert.Zero(t, p3.TraceLoaded)
	require.Len(t, p3.Warnings, 1)
	assert.Contains(t, p3.Warnings[0], "recorded for another model")
}

func TestEnginesSharingATraceFileKeepEachOthersEAMs(t *testing.T) {
	path := filepath.Join(t.TempDir(), "trace.bin")
	cfg := Config{BudgetBytes: 4 * slotBytes, TracePath: path}
	a, _ := newEngine(t, cfg, 2, 4)
	b, _ := newEngine(t, cfg, 2, 4)
	runRequest(t, a, [][]int32{{0, 1}, {2, 3}}, false)
	runRequest(t, b, [][]int32{{1, 2}, {3, 0}}, false)
	require.NoError(t, a.Close())
	require.NoError(t, b.Close(), "the second close merges instead of replacing")

	c, p := newEngine(t, cfg, 2, 4)
	assert.Equal(t, 2, p.TraceLoaded)
	require.NoError(t, c.Close(), "saving back what was loaded")
	_, p = newEngine(t, cfg, 2, 4)
	assert.Equal(t, 2, p.TraceLoaded, "loaded EAMs saved back are not counted twice")
}

func TestCorruptTraceFileIsReportedAndIgnored(t *testing.T) {
	path := filepath.Join(t.TempDir(), "trace.bin")
	require.NoError(t, writeFile(path, []byte("MOEITRC1 garbage")))
	_, p := newEngine(t, Config{BudgetBytes: 4 * slotBytes, TracePath: path}, 2, 4)
	require.Len(t, p.Warnings, 1)
	assert.Contains(t, p.Warnings[0], "ignored")
}

func TestCloseWithOutstandingLeaseFreesOnLastRelease(t *testing.T) {
	e, _ := newEngine(t, Config{BudgetBytes: 2 * slotBytes}, 1, 4)
	slots := make([]int32, 1)
	lease, err := e.Acquire(0, []int32{1}, slots, 0)
	require.NoError(t, err)
	require.NoError(t, e.Close())
	assert.True(t, e.Closed())
	// The slot memory is still mapped for the reader holding the lease.
	addr, _ := e.be.Arena()
	assert.NotZero(t, addr)
	require.NoError(t, e.Release(lease, 0))
	addr, _ = e.be.Arena()
	assert.Zero(t, addr, "the last release freed the arena")
}

func TestCloseWakesBlockedAcquire(t *testing.T) {
	e, _ := newEngine(t, Config{BudgetBytes: 1 * slotBytes, Prefetch: noPrefetch()}, 1, 4)
	lease, err := e.Acquire(0, []int32{0}, make([]int32, 1), 0)
	require.NoError(t, err)
	done := make(chan error)
	go func() {
		_, err := e.Acquire(0, []int32{1}, make([]int32, 1), 0)
		done <- err
	}()
	time.Sleep(20 * time.Millisecond)
	closed := make(chan error)
	go func() { closed <- e.Close() }()
	require.ErrorIs(t, <-done, ErrClosed)
	require.NoError(t, <-closed)
	require.NoError(t, e.Release(lease, 0))
}

func TestCloseStopsEveryGoroutine(t *testing.T) {
	before := runtime.NumGoroutine()
	for i := 0; i < 5; i++ {
		e, err := New(Config{BudgetBytes: 4 * slotBytes})
		require.NoError(t, err)
		model(t, e, 2, 4)
		_, err = e.Configure(Setup{Layout: mixtralSpec})
		require.NoError(t, err)
		runRequest(t, e, [][]int32{{0, 1}, {2, 3}}, false)
		require.NoError(t, e.Close())
	}
	after := runtime.NumGoroutine()
	for i := 0; i < 200 && after > before; i++ {
		time.Sleep(5 * time.Millisecond)
		after = runtime.NumGoroutine()
	}
	assert.LessOrEqual(t, after, before, "goroutines left running after Close")
}

func TestConcurrentRequestsStress(t *testing.T) {
	const L, E = 4, 8
	for _, pol := range []string{"priority", "lru", "lfu"} {
		t.Run(pol, func(t *testing.T) {
			e, _ := newEngine(t, Config{BudgetBytes: 5 * slotBytes, Policy: pol}, L, E)
			var wg sync.WaitGroup
			for w := 0; w < 6; w++ {
				wg.Add(1)
				go func(w int) {
					defer wg.Done()
					for r := 0; r < 20; r++ {
						req, err := e.BeginRequest()
						if !assert.NoError(t, err) {
							return
						}
						for l := 0; l < L; l++ {
							xs := []int32{int32((w + r + l) % E), int32((w*3 + l) % E)}
							counts := make([]float32, E)
							for _, x := range xs {
								counts[x]++
							}
							assert.NoError(t, e.Observe(l, []uint64{req}, [][]float32{counts}))
							if l+1 < L && r%3 == 0 {
								assert.NoError(t, e.Hint(l+1, []int32{int32((w + l) % E)}))
							}
							slots := make([]int32, 2)
							lease, err := e.Acquire(l, xs, slots, 0)
							if !assert.NoError(t, err) {
								return
							}
							// Check the slot really holds the expert.
							for i, x := range xs {
								got := slotFloats(t, e, int(slots[i]), 1)[0]
								assert.Equal(t, value(l, int(x), 0, 0), got)
							}
							assert.NoError(t, e.Release(lease, 0))
						}
						assert.NoError(t, e.EndRequest(req))
					}
				}(w)
			}
			wg.Wait()
			st, err := e.Stats()
			require.NoError(t, err)
			assert.Equal(t, st.Hits+st.Misses, uint64(6*20*L*2)-dupes(L, E))
			assert.Zero(t, e.Leases())
		})
	}
}

// dupes counts the acquires in TestConcurrentRequestsStress whose two
// experts coincide (they count as one use).
func dupes(L, E int) uint64 {
	n := uint64(0)
	for w := 0; w < 6; w++ {
		for r := 0; r < 20; r++ {
			for l := 0; l < L; l++ {
				if (w+r+l)%E == (w*3+l)%E {
					n++
				}
			}
		}
	}
	return n
}

func TestModulesListsRoles(t *testing.T) {
	e, err := New(Config{BudgetBytes: 1 << 20})
	require.NoError(t, err)
	defer e.Close()
	model(t, e, 2, 3)
	mods, err := e.Modules()
	require.NoError(t, err)
	require.Len(t, mods, 2)
	assert.Equal(t, "model.layers.0.block_sparse_moe", mods[0].Prefix)
	assert.Equal(t, 3, mods[0].NumExperts)
	assert.False(t, mods[0].Fused)
	require.Len(t, mods[0].Roles, 3)
	assert.Equal(t, RoleInfo{Name: "w1.weight", DType: "float32", Shape: []int64{tI, tH}, Tensor: "model.layers.0.block_sparse_moe.experts.0.w1.weight", Source: "host"}, mods[0].Roles[0])
}

func TestEngineTestHookPanics(t *testing.T) {
	e, err := New(Config{BudgetBytes: 1})
	require.NoError(t, err)
	assert.Panics(t, e.DebugPanic)
}

func writeFile(path string, b []byte) error { return os.WriteFile(path, b, 0o644) }

// TestStressFetchEvictPrefetchClose hammers one engine from many goroutines
// (acquire, release, observe, hint, requests) and closes it in the middle:
// no panic, no race, every call either succeeds or fails with ErrClosed, and
// the memory is freed once the last lease is released.
func TestStressFetchEvictPrefetchClose(t *testing.T) {
	const L, E = 4, 8
	for round := 0; round < 5; round++ {
		e, _ := newEngine(t, Config{BudgetBytes: 3 * slotBytes, PrefetchWindow: 3}, L, E)
		var wg sync.WaitGroup
		start := make(chan struct{})
		for w := 0; w < 8; w++ {
			wg.Add(1)
			go func(w int) {
				defer wg.Done()
				<-start
				for i := 0; ; i++ {
					req, err := e.BeginRequest()
					if err != nil {
						assert.ErrorIs(t, err, ErrClosed)
						return
					}
					l := (w + i) % L
					counts := make([]float32, E)
					counts[(w*i)%E] = 1
					if err := e.Observe(l, []uint64{req}, [][]float32{counts}); err != nil {
						assert.ErrorIs(t, err, ErrClosed)
						return
					}
					if err := e.Hint((l+1)%L, []int32{int32(i % E)}); err != nil {
						assert.ErrorIs(t, err, ErrClosed)
						return
					}
					slots := make([]int32, 2)
					lease, err := e.Acquire(l, []int32{int32(w % E), int32((w + i + 1) % E)}, slots, 0)
					if err != nil {
						assert.ErrorIs(t, err, ErrClosed)
						return
					}
					assert.NoError(t, e.Release(lease, 0))
					if err := e.EndRequest(req); err != nil {
						assert.ErrorIs(t, err, ErrClosed)
						return
					}
				}
			}(w)
		}
		close(start)
		time.Sleep(time.Duration(5+round*3) * time.Millisecond)
		require.NoError(t, e.Close())
		wg.Wait()
		assert.Zero(t, e.Leases())
		addr, _ := e.be.Arena()
		assert.Zero(t, addr, "the arena is freed")
	}
}

func TestTuneSwitchesPolicyPrefetchAndFlushes(t *testing.T) {
	e, _ := newEngine(t, Config{BudgetBytes: 4 * slotBytes}, 2, 4)
	acquire(t, e, 0, 0, 1)
	lru, off := "lru", false
	require.NoError(t, e.Tune(Tuning{Policy: &lru, Prefetch: &off, Flush: true, ResetStats: true}))
	p, err := e.Plan()
	require.NoError(t, err)
	assert.Equal(t, "lru", p.Policy)
	assert.False(t, p.Prefetch)
	assert.Equal(t, cache.PolicyLRU, e.cache.Policy())
	st, _ := e.Stats()
	assert.Zero(t, st.Resident, "flushed")
	assert.Zero(t, st.Misses, "stats reset")
	require.NoError(t, e.Hint(1, []int32{2}))
	assert.True(t, e.PrefetchIdle(), "prefetch off: hints are ignored")
	bad := "fifo"
	require.ErrorIs(t, e.Tune(Tuning{Policy: &bad}), ErrInvalid)
	on := true
	require.NoError(t, e.Tune(Tuning{Prefetch: &on}))
	require.NoError(t, e.Hint(1, []int32{2}))
	waitIdle(t, e)
	st, _ = e.Stats()
	assert.Equal(t, uint64(1), st.PrefetchLoads)
	require.NoError(t, e.Close())
	require.ErrorIs(t, e.Tune(Tuning{}), ErrClosed)
}

func TestPrefetchNeedsEvidence(t *testing.T) {
	const L, E = 4, 8
	e, _ := newEngine(t, Config{BudgetBytes: 6 * slotBytes}, L, E)
	pattern := [][]int32{{1, 2}, {3, 4}, {5, 6}, {7, 0}}
	runRequest(t, e, pattern, false)
	require.NoError(t, e.ResetStats())
	runRequest(t, e, pattern, true)
	st, _ := e.Stats()
	assert.Zero(t, st.PrefetchLoads, "a prediction resting on one token is not acted on")
}

// onCPUBackend is an Engine.NewBackend that makes the configured CPU
// backend and hands it to wrap (a stand-in for another backend).
func onCPUBackend(wrap func(*backend.CPU) backend.Backend) func(Config) (backend.Backend, error) {
	return func(cfg Config) (backend.Backend, error) {
		be, err := defaultBackend(cfg)
		if err != nil {
			return nil, err
		}
		return wrap(be.(*backend.CPU)), nil
	}
}
