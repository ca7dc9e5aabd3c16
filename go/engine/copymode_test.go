package engine

import (
	"math/rand/v2"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/backend"
	"github.com/moe-infinity/moe_infinity/go/cache"
)

func graphMissesPtr(s string) *string { return &s }

// captureCopyMode captures one step of L mapped layers in copy mode and
// returns the layers' buffers.
func captureCopyMode(t *testing.T, e *Engine, rng *rand.Rand, req uint64, L, E, T, K int, edit ...func([]*ffnIO)) []*ffnIO {
	t.Helper()
	require.NoError(t, e.Tune(Tuning{GraphMisses: graphMissesPtr("copy")}))
	assert.Equal(t, "copy", e.plan.GraphMisses)
	require.NoError(t, e.CaptureBegin())
	ios := make([]*ffnIO, L)
	for l := range L {
		ios[l] = newFFNIO(rng, T, K, E)
	}
	for _, f := range edit {
		f(ios)
	}
	for l := range L {
		require.NoError(t, e.LayerMapped(ios[l].call(l, T, K), []uint64{req}))
	}
	n, err := e.CaptureEnd()
	require.NoError(t, err)
	require.Equal(t, L, n)
	return ios
}

func distinctExperts(topk []int64) int {
	d := map[int64]bool{}
	for _, x := range topk {
		d[x] = true
	}
	return len(d)
}

// In copy mode every miss of a replayed layer is copied into a slot before
// the layer runs (a load, one transfer), so a second replay of the same
// routing hits everywhere, and the tracer neither re-counts nor admits.
func TestCopyModeLoadsEachMissOnceAndTheNextReplayHits(t *testing.T) {
	const L, E, T, K = 3, 4, 2, 2
	e := mappedEngine(t, L, E, 12) // every expert fits
	rng := rand.New(rand.NewPCG(21, 22))
	req, err := e.BeginRequest()
	require.NoError(t, err)
	ios := captureCopyMode(t, e, rng, req, L, E, T, K)
	want := 0
	for _, io := range ios {
		want += distinctExperts(io.topk)
	}

	require.NoError(t, e.GraphStep(0, []uint64{req}))
	st, err := e.Stats()
	require.NoError(t, err)
	assert.Equal(t, uint64(0), st.Hits)
	assert.Equal(t, uint64(want), st.Misses)
	assert.Equal(t, uint64(want), st.Loads, "every miss is copied in")
	assert.Equal(t, int64(want)*e.lay.SlotBytes, st.BytesMoved, "one transfer per miss")
	for l, io := range ios {
		for _, x := range io.topk {
			_, s := e.cache.Lookup(cache.Key{Layer: int32(l), Expert: int32(x)})
			assert.Equal(t, cache.Ready, s, "L%d/E%d is resident after the replay", l, x)
		}
	}

	require.NoError(t, e.GraphStep(0, []uint64{req}))
	st, err = e.Stats()
	require.NoError(t, err)
	assert.Equal(t, uint64(want), st.Hits, "the second replay hits everywhere")
	assert.Equal(t, uint64(want), st.Loads, "and loads nothing")
	assert.Positive(t, st.PhaseNs["serve"])
	assert.Zero(t, st.CopyLate)

	// The backend's tables point at the slots: mapped layers hit too.
	for l, io := range ios {
		require.NoError(t, e.LayerMapped(io.call(l, T, K), []uint64{req}))
	}
	st, err = e.Stats()
	require.NoError(t, err)
	assert.Equal(t, uint64(2*want), st.Hits, "eager mapped layers read the copied experts from their slots")
	assert.Equal(t, uint64(want), st.Misses)
	require.NoError(t, e.EndRequest(req))
	st, err = e.Stats()
	require.NoError(t, err)
	assert.Equal(t, 1, st.EAMCSize, "served replays are still traced")
	runtime.KeepAlive(ios)
}

// With fewer slots than a step's experts, every layer evicts experts of
// others; the slots must still end up holding what the tables say, so
// mapped layers computed afterwards match the synchronous path exactly.
func TestCopyModeKeepsTablesAndSlotsConsistentUnderEviction(t *testing.T) {
	const L, E, T, K = 4, 4, 1, 2
	e := mappedEngine(t, L, E, 3)
	oracle := mappedEngine(t, L, E, 3)
	rng := rand.New(rand.NewPCG(23, 24))
	req, err := e.BeginRequest()
	require.NoError(t, err)
	ios := captureCopyMode(t, e, rng, req, L, E, T, K)
	for range 3 {
		require.NoError(t, e.GraphStep(0, []uint64{req}))
	}
	st, err := e.Stats()
	require.NoError(t, err)
	assert.Equal(t, uint64(3*L*K), st.Hits+st.Misses)
	assert.Positive(t, st.Evictions)
	assert.Equal(t, int64(st.Loads)*e.lay.SlotBytes, st.BytesMoved)

	for l, io := range ios {
		want := reference(t, oracle, io, l, T, K)
		clear(io.out)
		require.NoError(t, e.LayerMapped(io.call(l, T, K), []uint64{req}))
		assert.Equal(t, want, io.out, "layer %d after copy-mode replays", l)
	}
	require.NoError(t, e.EndRequest(req))
	runtime.KeepAlive(ios)
}

func TestCopyModeReportsBadExpertIdsWithoutLoadingThem(t *testing.T) {
	const L, E, T, K = 2, 4, 1, 2
	e := mappedEngine(t, L, E, 8)
	rng := rand.New(rand.NewPCG(25, 26))
	req, err := e.BeginRequest()
	require.NoError(t, err)
	ios := captureCopyMode(t, e, rng, req, L, E, T, K, func(ios []*ffnIO) { ios[1].topk[0] = E })
	require.NoError(t, e.GraphStep(0, []uint64{req}))
	_, err = e.Stats()
	require.NoError(t, err)
	err = e.GraphStep(0, []uint64{req})
	assert.ErrorIs(t, err, ErrInvalid)
	assert.ErrorContains(t, err, "out of range")
	st, err := e.Stats()
	require.NoError(t, err)
	assert.LessOrEqual(t, st.Loads, uint64(L*K-1), "the bad id is never loaded")
	runtime.KeepAlive(ios)
}

func TestGraphMissesSetting(t *testing.T) {
	for _, c := range []struct {
		in, want string
		ok       bool
	}{{"", "auto", true}, {"auto", "auto", true}, {"copy", "copy", true}, {"read", "read", true}, {"AUTO", "", false}, {" copy ", "", false}, {"dma", "", false}} {
		cfg, err := Config{BudgetBytes: 1, GraphMisses: c.in}.withDefaults()
		if !c.ok {
			assert.ErrorIs(t, err, ErrInvalid, c.in)
			continue
		}
		require.NoError(t, err, c.in)
		assert.Equal(t, c.want, cfg.GraphMisses)
	}
	e := mappedEngine(t, 1, 2, 2)
	p, err := e.Plan()
	require.NoError(t, err)
	assert.Equal(t, "read", p.GraphMisses, "small experts are read in place")
	assert.ErrorIs(t, e.Tune(Tuning{GraphMisses: graphMissesPtr("both")}), ErrInvalid)
	require.NoError(t, e.Tune(Tuning{GraphMisses: graphMissesPtr("copy")}))
	p, err = e.Plan()
	require.NoError(t, err)
	assert.Equal(t, "copy", p.GraphMisses)
}

// silentCopies is a CPU backend whose replays never publish a layer (as if
// the GPU were still busy with earlier work): the copy driver waits in
// AwaitLayer until Close. It records the answers ServeLayer is given.
type silentCopies struct {
	*backend.CPU
	mu      sync.Mutex
	answers [][2]uint64 // (captured layer, sequence number)
}

func (s *silentCopies) AwaitLayer(i int, stop <-chan struct{}) ([]int64, uint64, error) {
	<-stop
	return nil, 0, backend.ErrClosed
}

func (s *silentCopies) ServeLayer(i int, seq uint64, loads []backend.SlotLoad) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.answers = append(s.answers, [2]uint64{uint64(i), seq})
	return nil
}

// Close with copy-mode replays queued and in flight must not leave any of
// their layers waiting on the device: every layer of every pending replay
// is answered ahead of its routing, in order, and Close returns.
func TestCloseAnswersEveryLayerOfPendingCopyModeReplays(t *testing.T) {
	const L, E, T, K = 3, 4, 1, 2
	var be *silentCopies
	e := mappedEngine(t, L, E, 8, func(e *Engine) {
		e.NewBackend = func(Config) (backend.Backend, error) {
			be = &silentCopies{CPU: backend.NewCPU(1)}
			return be, nil
		}
	})
	rng := rand.New(rand.NewPCG(27, 28))
	req, err := e.BeginRequest()
	require.NoError(t, err)
	ios := captureCopyMode(t, e, rng, req, L, E, T, K)
	require.NoError(t, e.GraphStep(0, []uint64{req}))
	require.NoError(t, e.GraphStep(0, []uint64{req}))

	closed := make(chan error, 1)
	go func() { closed <- e.Close() }()
	select {
	case err := <-closed:
		require.NoError(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return with copy-mode replays pending")
	}
	var want [][2]uint64
	for seq := uint64(1); seq <= 2; seq++ {
		for i := range L {
			want = append(want, [2]uint64{uint64(i), seq})
		}
	}
	assert.Equal(t, want, be.answers, "each pending replay's layers, answered in order")
	runtime.KeepAlive(ios)
}

func TestChooseGraphMissesRestsOnTheMeasuredRates(t *testing.T) {
	const qwen3, mixtral = 9_437_184, 352 << 20                             // expert bytes
	slowZC := &LinkRates{DMAGBps: 52, ZeroCopyGBps: 33, ReactionUs: 20}     // the 2026-12-06 H100 host
	fastZC := &LinkRates{DMAGBps: 54.7, ZeroCopyGBps: 50.6, ReactionUs: 20} // earlier H100 hosts
	for _, tc := range []struct {
		name     string
		bytes    int64
		rates    *LinkRates
		copyMode bool
		want     string
	}{
		{"fine-grained experts, zero-copy well below DMA: copy", qwen3, slowZC, true, "copy"},
		{"fine-grained experts, zero-copy near DMA: read in place", qwen3, fastZC, true, "read"},
		{"big experts, zero-copy near DMA: copy", mixtral, fastZC, true, "copy"},
		{"zero-copy faster than DMA: never copy", mixtral, &LinkRates{DMAGBps: 30, ZeroCopyGBps: 50, ReactionUs: 0}, true, "read"},
		{"slow reaction: reading in place wins for small experts", 1 << 20, &LinkRates{DMAGBps: 52, ZeroCopyGBps: 33, ReactionUs: 500}, true, "read"},
		{"not measured: by size, small", qwen3, nil, true, "read"},
		{"not measured: by size, big", CopyMissesFrom, nil, true, "copy"},
		{"no copy mode", mixtral, slowZC, false, "read"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			assert.Equal(t, tc.want, ChooseGraphMisses(tc.bytes, tc.rates, tc.copyMode))
		})
	}
}

func TestLinkRatesReachThePlanAndAutoUsesThem(t *testing.T) {
	for _, tc := range []struct {
		rates *LinkRates
		want  string
	}{
		{nil, "read"}, // 4 KiB experts, not measured: read in place
		{&LinkRates{DMAGBps: 52, ZeroCopyGBps: 1, ReactionUs: 0}, "copy"},
	} {
		e, err := New(Config{BudgetBytes: 8 * 4096, MaxSlots: 8, LinkRates: tc.rates})
		require.NoError(t, err)
		bf16Model(t, e, 2, 4)
		e.NewBackend = func(Config) (backend.Backend, error) { return &silentCopies{CPU: backend.NewCPU(1)}, nil }
		p, err := e.Configure(Setup{Layout: mixtralSpec})
		require.NoError(t, err)
		assert.Equal(t, tc.want, p.GraphMisses)
		assert.Equal(t, tc.rates, p.LinkRates)
		require.NoError(t, e.Close())
	}
}

func TestLinkRatesAreValidated(t *testing.T) {
	for _, bad := range []string{
		`{"budget_bytes": 1, "link_rates": {"dma_gbps": 0, "zero_copy_gbps": 33}}`,
		`{"budget_bytes": 1, "link_rates": {"dma_gbps": 52, "zero_copy_gbps": -1}}`,
		`{"budget_bytes": 1, "link_rates": {"dma_gbps": 52, "zero_copy_gbps": 33, "reaction_us": -5}}`,
		`{"budget_bytes": 1, "link_rates": {"dma_gbps": 52, "zero_copy": 33}}`,
	} {
		_, err := ParseConfig([]byte(bad))
		assert.ErrorIs(t, err, ErrInvalid, bad)
	}
	c, err := ParseConfig([]byte(`{"budget_bytes": 1, "link_rates": {"dma_gbps": 52, "zero_copy_gbps": 33, "reaction_us": 20}}`))
	require.NoError(t, err)
	assert.Equal(t, &LinkRates{DMAGBps: 52, ZeroCopyGBps: 33, ReactionUs: 20}, c.LinkRates)
}
