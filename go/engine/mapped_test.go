package engine

import (
	"encoding/binary"
	"fmt"
	"math"
	"math/rand/v2"
	"runtime"
	"sync"
	"testing"
	"time"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/backend"
	"github.com/moe-infinity/moe_infinity/go/cache"
	"github.com/moe-infinity/moe_infinity/go/dtype"
)

const (
	mH = 16 // hidden
	mI = 8  // intermediate
)

func bf16Bytes(vals []float32) []byte {
	b := make([]byte, 2*len(vals))
	for i, v := range vals {
		binary.LittleEndian.PutUint16(b[2*i:], dtype.F32BitsToBF16(math.Float32bits(v)))
	}
	return b
}

// mappedEngine is a bf16 Mixtral-style model of L × E experts whose
// weights differ per expert, with a cache of `slots` slots.
func mappedEngine(t *testing.T, L, E, slots int, before ...func(*Engine)) *Engine {
	t.Helper()
	e, _ := bf16Engine(t, Setup{Layout: mixtralSpec}, L, E, slots, before...)
	return e
}

// bf16Engine configures bf16Model with setup and a cache of `slots` slots,
// after the before hooks (which may replace the backend).
func bf16Engine(t *testing.T, setup Setup, L, E, slots int, before ...func(*Engine)) (*Engine, Plan) {
	t.Helper()
	e, err := New(Config{BudgetBytes: int64(slots) * 4096, MaxSlots: slots})
	require.NoError(t, err)
	bf16Model(t, e, L, E)
	for _, f := range before {
		f(e)
	}
	p, err := e.Configure(setup)
	require.NoError(t, err)
	t.Cleanup(func() { _ = e.Close() })
	return e, p
}

// eachBF16Tensor calls fn with every tensor of a bf16 Mixtral-style model
// of L × E experts whose weights differ per expert (the same values on
// every call): its name, shape and bfloat16 bytes.
func eachBF16Tensor(L, E int, fn func(name string, shape []int64, data []byte)) {
	rng := rand.New(rand.NewPCG(1, 2))
	for l := 0; l < L; l++ {
		for x := 0; x < E; x++ {
			for _, ro := range []struct {
				name string
				r, c int64
			}{{"w1.weight", mI, mH}, {"w2.weight", mH, mI}, {"w3.weight", mI, mH}} {
				vals := make([]float32, ro.r*ro.c)
				for i := range vals {
					vals[i] = float32(rng.NormFloat64()) * 0.5
				}
				fn(fmt.Sprintf("model.layers.%d.block_sparse_moe.experts.%d.%s", l, x, ro.name), []int64{ro.r, ro.c}, bf16Bytes(vals))
			}
		}
	}
}

// bf16Model registers eachBF16Tensor's model as host tensors.
func bf16Model(t *testing.T, e *Engine, L, E int) {
	t.Helper()
	eachBF16Tensor(L, E, func(name string, shape []int64, data []byte) {
		require.NoError(t, e.AddHostTensor(name, "BF16", shape, data))
	})
}

// ffnIO holds one call's buffers in Go memory (the CPU backend reads
// host addresses).
type ffnIO struct {
	x, out  []byte
	scratch []float32
	topk    []int64
	weights []float32
}

// newFFNIO is one call's buffers at the bf16 test model's sizes, each
// token's experts weighted equally.
func newFFNIO(rng *rand.Rand, T, K, E int) *ffnIO {
	return ffnIOOf(rng, T, K, E, mH, mI, func() float32 { return 1 / float32(K) })
}

// ffnIOOf is one call's buffers for experts of hidden × inter: random
// activations, each token routed to K distinct experts (a random
// permutation's first K) with the weights weight draws, in order.
func ffnIOOf(rng *rand.Rand, T, K, E, hidden, inter int, weight func() float32) *ffnIO {
	io := &ffnIO{out: make([]byte, 2*T*hidden), scratch: make([]float32, T*K*inter), topk: make([]int64, T*K), weights: make([]float32, T*K)}
	xs := make([]float32, T*hidden)
	for i := range xs {
		xs[i] = float32(rng.NormFloat64())
	}
	io.x = bf16Bytes(xs)
	for t := 0; t < T; t++ {
		perm := rng.Perm(E)
		for j := 0; j < K; j++ {
			io.topk[t*K+j], io.weights[t*K+j] = int64(perm[j]), weight()
		}
	}
	return io
}

func addr[T any](s []T) uint64 { return uint64(uintptr(unsafe.Pointer(&s[0]))) }

func (io *ffnIO) call(layer, T, K int) FFNCall {
	return FFNCall{Layer: layer, X: addr(io.x), Out: addr(io.out), Scratch: addr(io.scratch), TopK: addr(io.topk),
		Weights: addr(io.weights), T: int64(T), K: int64(K), DType: dtype.BF16, WDType: dtype.F32}
}

// reference computes the call through the synchronous path (Acquire of
// the distinct experts, then the kernels on the slots).
func reference(t *testing.T, e *Engine, io *ffnIO, layer, T, K int) []byte {
	t.Helper()
	ref := &ffnIO{x: io.x, out: make([]byte, len(io.out)), scratch: make([]float32, len(io.scratch)), topk: io.topk, weights: io.weights}
	c := ref.call(layer, T, K)
	seen := map[int64]bool{}
	for _, x := range io.topk {
		if !seen[x] {
			seen[x] = true
			c.Experts = append(c.Experts, int32(x))
		}
	}
	require.NoError(t, e.LayerFFN(c))
	return ref.out
}

func waitResident(t *testing.T, e *Engine, k cache.Key) {
	t.Helper()
	require.Eventually(t, func() bool {
		_, st := e.cache.Lookup(k)
		return st == cache.Ready
	}, 5*time.Second, time.Millisecond)
}

func TestMappedLayerMatchesTheSynchronousPathAndAdmitsMisses(t *testing.T) {
	const L, E, T, K = 2, 4, 3, 2
	e := mappedEngine(t, L, E, 4)
	oracle := mappedEngine(t, L, E, 4)
	rng := rand.New(rand.NewPCG(3, 4))
	io := newFFNIO(rng, T, K, E)
	req, err := e.BeginRequest()
	require.NoError(t, err)

	require.NoError(t, e.LayerMapped(io.call(1, T, K), []uint64{req}))
	assert.Equal(t, reference(t, oracle, io, 1, T, K), io.out, "cold: every expert read from host memory")
	st, err := e.Stats()
	require.NoError(t, err)
	distinct := map[int64]bool{}
	for _, x := range io.topk {
		distinct[x] = true
	}
	assert.Equal(t, uint64(0), st.Hits)
	assert.Equal(t, uint64(len(distinct)), st.Misses)
	assert.Equal(t, uint64(len(distinct)), st.Loads, "empty slots admit every miss")

	for x := range distinct {
		waitResident(t, e, cache.Key{Layer: 1, Expert: int32(x)})
	}
	clear(io.out)
	require.NoError(t, e.LayerMapped(io.call(1, T, K), []uint64{req}))
	assert.Equal(t, reference(t, oracle, io, 1, T, K), io.out, "warm: every expert read from its slot")
	st, err = e.Stats()
	require.NoError(t, err)
	assert.Equal(t, uint64(len(distinct)), st.Hits)
	require.NoError(t, e.EndRequest(req))
	runtime.KeepAlive(io)
}

func TestMappedLayerRejectsBadInput(t *testing.T) {
	e := mappedEngine(t, 1, 4, 2)
	io := newFFNIO(rand.New(rand.NewPCG(5, 6)), 1, 2, 4)
	bad := io.call(3, 1, 2)
	assert.ErrorIs(t, e.LayerMapped(bad, nil), ErrInvalid, "layer out of range")
	c := io.call(0, 1, 2)
	c.DType = dtype.F16
	assert.ErrorIs(t, e.LayerMapped(c, nil), ErrInvalid, "float16 activations for bfloat16 experts")
	c.DType = dtype.Invalid
	err := e.LayerMapped(c, nil)
	assert.ErrorIs(t, err, ErrInvalid)
	assert.ErrorContains(t, err, "activations are of another type (not bfloat16 or float16) but the experts are bfloat16")
	c.DType, c.WDType = dtype.BF16, dtype.F64
	assert.ErrorContains(t, e.LayerMapped(c, nil), "routing-weight dtype F64", "routing weights the kernels do not read")
	// An id out of range is skipped by the computation (as on a GPU,
	// where it is only seen once the routing reaches the host) and
	// reported by a call after the tracer has read it...
	io.topk[1] = 9
	require.NoError(t, e.LayerMapped(io.call(0, 1, 2), nil))
	e.drainMapped()
	io.topk[1] = 2
	err = e.LayerMapped(io.call(0, 1, 2), nil)
	require.ErrorIs(t, err, ErrInvalid)
	assert.Contains(t, err.Error(), "routes to expert 9, out of range [0, 4)")
	require.NoError(t, e.LayerMapped(io.call(0, 1, 2), nil), "reported once")
	// ...or, after a request's last layer, by the end of the request.
	req, err := e.BeginRequest()
	require.NoError(t, err)
	io.topk[0] = -1
	require.NoError(t, e.LayerMapped(io.call(0, 1, 2), []uint64{req}))
	assert.ErrorIs(t, e.EndRequest(req), ErrInvalid)
	runtime.KeepAlive(io)
}

func TestMappedModeNeedsAKernelBackend(t *testing.T) {
	e, _ := newEngine(t, Config{BudgetBytes: 4 * slotBytes}, 1, 4) // float32 experts: no kernels
	io := newFFNIO(rand.New(rand.NewPCG(5, 6)), 1, 2, 4)
	assert.ErrorIs(t, e.LayerMapped(io.call(0, 1, 2), nil), ErrUnsupported)
	runtime.KeepAlive(io)
}

// Admissions evict and refill slots while layers compute: every output
// must still be exact (the slot's old expert is unmapped before the copy
// into it, the new one mapped after), and tracing must account for every
// call.
func TestMappedLayersStayExactWhileTheCacheChurns(t *testing.T) {
	const L, E, T, K, calls, flushEvery = 3, 8, 2, 2, 300, 50
	for _, policy := range []string{"lru", "lfu", "priority"} {
		t.Run(policy, func(t *testing.T) {
			e := mappedEngine(t, L, E, 3)
			oracle := mappedEngine(t, L, E, 8)
			p := policy
			require.NoError(t, e.Tune(Tuning{Policy: &p}))
			rng := rand.New(rand.NewPCG(7, 8))
			req, err := e.BeginRequest()
			require.NoError(t, err)
			var wg sync.WaitGroup
			stop := make(chan struct{})
			kick := make(chan struct{}, 1)
			wg.Add(1)
			go func() { // flushes race with computations too
				defer wg.Done()
				for {
					select {
					case <-stop:
						return
					case <-kick:
						assert.NoError(t, e.Tune(Tuning{Flush: true}))
					}
				}
			}()
			uses := 0
			for i := 0; i < calls; i++ {
				// A flush every flushEvery calls, whatever the machine's
				// speed (a wall-clock period flushed every few calls under
				// -race, leaving LFU's full cache no call to evict in).
				if i%flushEvery == flushEvery-1 {
					select {
					case kick <- struct{}{}:
					default:
					}
				}
				layer := i % L
				io := newFFNIO(rng, T, K, E)
				d := map[int64]bool{}
				for _, x := range io.topk {
					d[x] = true
				}
				uses += len(d)
				require.NoError(t, e.LayerMapped(io.call(layer, T, K), []uint64{req}))
				require.Equal(t, reference(t, oracle, io, layer, T, K), io.out, "call %d", i)
			}
			close(stop)
			wg.Wait()
			st, err := e.Stats()
			require.NoError(t, err)
			assert.Equal(t, uint64(uses), st.Hits+st.Misses, "every distinct expert of every call is counted once")
			assert.Positive(t, st.Evictions)
			require.NoError(t, e.EndRequest(req))
		})
	}
}

var _ backend.Mapped = (*backend.CPU)(nil)

func TestCapturedStepsAreTracedOnEachReplay(t *testing.T) {
	const L, E, T, K = 3, 4, 1, 2
	e := mappedEngine(t, L, E, 8)
	rng := rand.New(rand.NewPCG(9, 10))
	ios := make([]*ffnIO, L)
	req, err := e.BeginRequest()
	require.NoError(t, err)
	assert.ErrorIs(t, e.GraphStep(0, []uint64{req}), ErrState, "nothing captured yet")

	require.NoError(t, e.CaptureBegin())
	assert.ErrorIs(t, e.CaptureBegin(), ErrState, "one capture at a time")
	for l := 0; l < L; l++ {
		ios[l] = newFFNIO(rng, T, K, E)
		require.NoError(t, e.LayerMapped(ios[l].call(l, T, K), []uint64{req}))
	}
	_, err = e.Acquire(0, []int32{0}, make([]int32, 1), 0)
	assert.ErrorIs(t, err, ErrState, "acquire cannot be captured")
	n, err := e.CaptureEnd()
	require.NoError(t, err)
	assert.Equal(t, L, n)
	st, err := e.Stats()
	require.NoError(t, err)
	assert.Zero(t, st.Hits+st.Misses, "the capture itself is not traced")

	for replay := 1; replay <= 3; replay++ {
		require.NoError(t, e.GraphStep(0, []uint64{req}))
		st, err = e.Stats()
		require.NoError(t, err)
		assert.Equal(t, uint64(replay*L*K), st.Hits+st.Misses, "replay %d traced every layer", replay)
	}
	require.NoError(t, e.EndRequest(req))
	st, err = e.Stats()
	require.NoError(t, err)
	assert.Equal(t, 1, st.EAMCSize)
	_, err = e.CaptureEnd()
	assert.ErrorIs(t, err, ErrState)
	runtime.KeepAlive(ios)
}

// A synchronous layer (a prefill) before the first mapped one: the experts
// it loaded must be read from their slots by the mapped layers that follow
// and count as hits. Mapped mode used to start with the first mapped layer,
// its tables pointing every expert at host memory, so the prefill's experts
// were missed (and read over the link) for as long as they stayed cached.
func TestExpertsLoadedBeforeTheFirstMappedLayerAreReadFromTheirSlots(t *testing.T) {
	const L, E, T, K = 2, 4, 2, 2
	e := mappedEngine(t, L, E, 8) // every expert fits
	rng := rand.New(rand.NewPCG(11, 12))
	io := newFFNIO(rng, T, K, E)
	ref := reference(t, e, io, 0, T, K) // the synchronous path loads the layer's experts
	loadsBefore := func() uint64 {
		st, err := e.Stats()
		require.NoError(t, err)
		return st.Loads
	}()
	require.NoError(t, e.ResetStats())

	req, err := e.BeginRequest()
	require.NoError(t, err)
	clear(io.out)
	require.NoError(t, e.LayerMapped(io.call(0, T, K), []uint64{req}))
	assert.Equal(t, ref, io.out)
	st, err := e.Stats()
	require.NoError(t, err)
	distinct := map[int64]bool{}
	for _, x := range io.topk {
		distinct[x] = true
	}
	assert.Positive(t, loadsBefore)
	assert.Equal(t, uint64(len(distinct)), st.Hits, "the prefill's experts are resident for the mapped layer")
	assert.Zero(t, st.Misses)
	assert.Zero(t, st.Loads, "nothing is loaded twice")
	require.NoError(t, e.EndRequest(req))
}
