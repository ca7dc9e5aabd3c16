//go:build cgo

package cpuffn_test

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/backend"
	"github.com/moe-infinity/moe_infinity/go/cpuffn"
	"github.com/moe-infinity/moe_infinity/go/dtype"
)

func addr[T any](s []T) uint64 {
	if len(s) == 0 {
		return 0
	}
	return uint64(uintptr(unsafe.Pointer(&s[0])))
}

// layer is one random MoE layer call in Go memory.
type layer struct {
	T, K, H, I, E int64
	f16           bool
	wdt           dtype.DType
	x             []uint16
	gateUp, down  [][]uint16
	topk          []int64
	wts           []byte
}

func bits(v float32, f16 bool) uint16 {
	if f16 {
		return dtype.F32BitsToF16(math.Float32bits(v))
	}
	return dtype.F32BitsToBF16(math.Float32bits(v))
}

func value(b uint16, f16 bool) float32 {
	if f16 {
		return math.Float32frombits(dtype.F16ToF32Bits(b))
	}
	return math.Float32frombits(uint32(b) << 16)
}

func newLayer(seed uint64, T, K, H, I, E int64, f16 bool, wdt dtype.DType) *layer {
	rng := rand.New(rand.NewPCG(seed, 7))
	l := &layer{T: T, K: K, H: H, I: I, E: E, f16: f16, wdt: wdt}
	fill := func(n int64, scale float32) []uint16 {
		s := make([]uint16, n)
		for i := range s {
			s[i] = bits((rng.Float32()*2-1)*scale, f16)
		}
		return s
	}
	l.x = fill(T*H, 1)
	for range E {
		l.gateUp = append(l.gateUp, fill(2*I*H, 2/float32(math.Sqrt(float64(H)))))
		l.down = append(l.down, fill(H*I, 2/float32(math.Sqrt(float64(I)))))
	}
	for range T {
		for _, e := range rng.Perm(int(E))[:K] {
			l.topk = append(l.topk, int64(e))
		}
	}
	for range T * K {
		w := rng.Float32()
		switch wdt {
		case dtype.F32:
			l.wts = append(l.wts, unsafe.Slice((*byte)(unsafe.Pointer(&w)), 4)...)
		case dtype.BF16:
			b := dtype.F32BitsToBF16(math.Float32bits(w))
			l.wts = append(l.wts, byte(b), byte(b>>8))
		default:
			b := dtype.F32BitsToF16(math.Float32bits(w))
			l.wts = append(l.wts, byte(b), byte(b>>8))
		}
	}
	return l
}

// args are the backend's FFN arguments for l, writing out and scratch.
func (l *layer) args(out []uint16, scratch []float32) backend.FFNArgs {
	a := backend.FFNArgs{
		X: addr(l.x), Out: addr(out), Scratch: addr(scratch), TopK: addr(l.topk), Weights: addr(l.wts),
		T: l.T, K: l.K, Hidden: l.H, Inter: l.I, DType: dtype.BF16, WDType: l.wdt,
	}
	if l.f16 {
		a.DType = dtype.F16
	}
	for e := range l.E {
		a.GateUp = append(a.GateUp, addr(l.gateUp[e]))
		a.Down = append(a.Down, addr(l.down[e]))
	}
	return a
}

// problem is l for package cpuffn; skip lists pairs that contribute
// nothing.
func (l *layer) problem(out []uint16, scratch []float32, skip map[int]bool) cpuffn.Problem {
	a := l.args(out, scratch)
	P := l.T * l.K
	p := cpuffn.Problem{T: l.T, K: l.K, Hidden: l.H, Inter: l.I, F16: l.f16, X: a.X, Out: a.Out, Scratch: a.Scratch}
	for i := range P {
		switch l.wdt {
		case dtype.F32:
			p.Weights = append(p.Weights, *(*float32)(unsafe.Pointer(&l.wts[4*i])))
		case dtype.BF16:
			p.Weights = append(p.Weights, value(uint16(l.wts[2*i])|uint16(l.wts[2*i+1])<<8, false))
		default:
			p.Weights = append(p.Weights, value(uint16(l.wts[2*i])|uint16(l.wts[2*i+1])<<8, true))
		}
		e := l.topk[i]
		if skip[int(i)] {
			p.Gate, p.Up, p.Down = append(p.Gate, 0), append(p.Up, 0), append(p.Down, 0)
			continue
		}
		p.Gate = append(p.Gate, a.GateUp[e])
		p.Up = append(p.Up, a.UpAddr(e))
		p.Down = append(p.Down, a.Down[e])
	}
	return p
}

// reference is the Go reference FFN's output for l.
func (l *layer) reference(t *testing.T) []uint16 {
	out, scratch := make([]uint16, l.T*l.H), make([]float32, l.T*l.K*l.I)
	require.NoError(t, backend.NewCPU(1).ReferenceFFN(l.args(out, scratch)))
	return out
}

// assertClose checks got against the reference want. Tolerance: the SIMD
// paths sum each dot product in 8/16 float32 lanes (vdpbf16ps: product
// pairs, denormals flushed) instead of index order, so a projection's
// float32 result moves by a few float32 ulps and, after rounding to the
// activation type, sometimes lands one ulp (2^-8 relative for bfloat16,
// 2^-11 for float16) away. Such a step in h moves the down projection by
// far less than one of its ulps, and the output, a weighted sum of up to
// K rounded projections, by at most about one ulp of the largest of
// them. So each element may differ by 2 ulps of itself plus one ulp of
// its token's largest output (which bounds the projections' ulps up to
// the routing weights' sum, <= K). At most a tenth of the bfloat16
// elements may differ at all, and a quarter of the float16 ones: float16's
// finer rounding turns smaller float32 differences into a different
// result (measured on Zen 4: up to ~4% for bfloat16, ~11% for float16,
// both at I = 896).
func assertClose(t *testing.T, want, got []uint16, H int64, f16 bool) {
	t.Helper()
	ulp := float32(1.0 / 256)
	if f16 {
		ulp = 1.0 / 2048
	}
	differ := 0
	for i := range want {
		if want[i] == got[i] {
			continue
		}
		differ++
		rowMax := float32(0)
		row := int64(i) / H
		for _, v := range want[row*H : (row+1)*H] {
			rowMax = max(rowMax, float32(math.Abs(float64(value(v, f16)))))
		}
		w, g := value(want[i], f16), value(got[i], f16)
		tol := 2*ulp*float32(math.Abs(float64(w))) + ulp*rowMax
		require.LessOrEqual(t, math.Abs(float64(w-g)), float64(tol), "element %d: got %v, want %v", i, g, w)
	}
	limit := len(want) / 10
	if f16 {
		limit = len(want) / 4
	}
	t.Logf("%d of %d elements differ", differ, len(want))
	assert.LessOrEqual(t, differ, max(limit, 2), "%d of %d elements differ", differ, len(want))
}

type shape struct{ H, I int64 }

var shapes = []shape{
	{33, 17},   // neither a multiple of any vector width
	{64, 48},   // whole AVX2 and AVX-512 vectors
	{130, 70},  // vectors and tails
	{256, 896}, // Mixtral's 4096 × 14336, divided by 16
}

var routings = []struct{ T, K int64 }{{1, 1}, {1, 2}, {3, 4}, {16, 8}, {5, 8}, {16, 2}}

func TestKernelMatchesTheReference(t *testing.T) {
	n := 0
	for _, sh := range shapes {
		for _, rt := range routings {
			for _, f16 := range []bool{false, true} {
				n++
				wdt := []dtype.DType{dtype.F32, dtype.BF16, dtype.F16}[n%3]
				dt := "bf16"
				if f16 {
					dt = "f16"
				}
				l := newLayer(uint64(n), rt.T, rt.K, sh.H, sh.I, 8, f16, wdt)
				want := l.reference(t)
				for _, isa := range cpuffn.ISAs {
					name := fmt.Sprintf("H%d_I%d_T%d_K%d_%s_w%s_%s", sh.H, sh.I, rt.T, rt.K, dt, wdt, isa)
					t.Run(name, func(t *testing.T) {
						if !cpuffn.Supported(isa) {
							t.Skipf("this CPU lacks %s", isa)
						}
						threads := 1 + n%4
						k, err := cpuffn.NewISA(threads, isa)
						require.NoError(t, err)
						defer k.Close()
						out, scratch := make([]uint16, l.T*l.H), make([]float32, l.T*l.K*l.I)
						require.NoError(t, k.Run(l.problem(out, scratch, nil)))
						if isa == cpuffn.Scalar {
							assert.Equal(t, want, out, "the scalar path sums in the reference's order: bitwise equal")
							return
						}
						assertClose(t, want, out, l.H, f16)
					})
				}
			}
		}
	}
}

func TestKernelSkipsPairsWithoutExperts(t *testing.T) {
	l := newLayer(99, 4, 2, 33, 17, 4, false, dtype.F32)
	skip := map[int]bool{1: true, 4: true, 5: true} // token 2 has none left
	out, scratch := make([]uint16, l.T*l.H), make([]float32, l.T*l.K*l.I)
	for i := range scratch {
		scratch[i] = 7
	}
	k, err := cpuffn.NewISA(2, cpuffn.Scalar)
	require.NoError(t, err)
	defer k.Close()
	require.NoError(t, k.Run(l.problem(out, scratch, skip)))

	// The reference, with SkipInvalid and the skipped pairs routed nowhere.
	want, wantScratch := make([]uint16, l.T*l.H), make([]float32, l.T*l.K*l.I)
	a := l.args(want, wantScratch)
	topk := append([]int64(nil), l.topk...)
	for p := range skip {
		topk[p] = -1
	}
	a.TopK, a.SkipInvalid = addr(topk), true
	require.NoError(t, backend.NewCPU(1).ReferenceFFN(a))
	assert.Equal(t, want, out)
	assert.Equal(t, wantScratch, scratch, "skipped pairs have h = 0")
	assert.Equal(t, make([]uint16, l.H), out[2*l.H:3*l.H], "a token without experts gets zeros")
}

func TestKernelReusesItsWorkspaceAcrossShapes(t *testing.T) {
	k := cpuffn.New(3)
	defer k.Close()
	for i, sh := range []shape{{256, 896}, {33, 17}, {130, 70}} {
		l := newLayer(uint64(200+i), 16, 8, sh.H, sh.I, 8, false, dtype.BF16)
		out, scratch := make([]uint16, l.T*l.H), make([]float32, l.T*l.K*l.I)
		require.NoError(t, k.Run(l.problem(out, scratch, nil)))
		assertClose(t, l.reference(t), out, l.H, false)
	}
}

func TestKernelRejectsBadProblems(t *testing.T) {
	k := cpuffn.New(1)
	l := newLayer(1, 1, 2, 33, 17, 4, false, dtype.F32)
	out, scratch := make([]uint16, l.H), make([]float32, 2*l.I)
	good := l.problem(out, scratch, nil)
	for name, mod := range map[string]func(*cpuffn.Problem){
		"no tokens":                  func(p *cpuffn.Problem) { p.T = 0 },
		"weights short":              func(p *cpuffn.Problem) { p.Weights = p.Weights[:1] },
		"null output":                func(p *cpuffn.Problem) { p.Out = 0 },
		"gate without down":          func(p *cpuffn.Problem) { p.Down = []uint64{0, p.Down[1]} },
		"tables of the wrong length": func(p *cpuffn.Problem) { p.Up = p.Up[:1] },
	} {
		p := good
		p.Weights, p.Gate, p.Up, p.Down = append([]float32(nil), good.Weights...), append([]uint64(nil), good.Gate...), append([]uint64(nil), good.Up...), append([]uint64(nil), good.Down...)
		mod(&p)
		assert.Error(t, k.Run(p), name)
	}
}

func TestISAs(t *testing.T) {
	assert.True(t, cpuffn.Supported(cpuffn.Scalar), "the scalar path runs everywhere")
	assert.True(t, cpuffn.Supported(cpuffn.Best()))
	for i, isa := range cpuffn.ISAs {
		if i > 0 && cpuffn.Supported(isa) {
			assert.True(t, cpuffn.Supported(cpuffn.ISAs[i-1]), "%s implies %s", isa, cpuffn.ISAs[i-1])
		}
	}
	_, err := cpuffn.NewISA(1, cpuffn.ISA(9))
	assert.Error(t, err)
	assert.Equal(t, "avx512bf16", cpuffn.AVX512BF16.String())
}

func TestReadBandwidth(t *testing.T) {
	gbps, err := cpuffn.ReadBandwidth(4<<20, 2, 2)
	require.NoError(t, err)
	assert.Positive(t, gbps)
	_, err = cpuffn.ReadBandwidth(1024, 1, 1)
	assert.Error(t, err, "too small a buffer")
}

// TestKernelPartialsAndAddends splits a layer's pairs between two calls,
// as hybrid execution splits them between the CPU and the device: the
// first writes its float32 partial sums (PartialOut), the second adds them
// (Addend). The scalar path matches the reference given the same addend
// bit for bit; every path's partial rounds to what the same call writes
// to Out; and the two halves together are the whole layer within the
// kernels' tolerance.
func TestKernelPartialsAndAddends(t *testing.T) {
	for _, f16 := range []bool{false, true} {
		for _, isa := range cpuffn.ISAs {
			t.Run(fmt.Sprintf("f16=%v_%s", f16, isa), func(t *testing.T) {
				if !cpuffn.Supported(isa) {
					t.Skipf("this CPU lacks %s", isa)
				}
				l := newLayer(31, 5, 4, 130, 70, 8, f16, dtype.BF16)
				// The device computes experts 0-3, the CPU experts 4-7.
				cpuPairs, devPairs := map[int]bool{}, map[int]bool{}
				for p, e := range l.topk {
					if e < 4 {
						devPairs[p] = true
					} else {
						cpuPairs[p] = true
					}
				}
				k, err := cpuffn.NewISA(2, isa)
				require.NoError(t, err)
				defer k.Close()
				scratch := make([]float32, l.T*l.K*l.I)

				// The CPU's part, as a partial and as an output.
				partial := make([]float32, l.T*l.H)
				for i := range partial {
					partial[i] = float32(math.NaN()) // every element is written
				}
				p := l.problem(nil, scratch, devPairs)
				p.Out, p.PartialOut = 0, addr(partial)
				require.NoError(t, k.Run(p))
				rounded := make([]uint16, l.T*l.H)
				p = l.problem(rounded, scratch, devPairs)
				require.NoError(t, k.Run(p))
				for i, v := range partial {
					require.False(t, math.IsNaN(float64(v)), "element %d not written", i)
					require.Equal(t, rounded[i], bits(v, f16), "element %d: the partial rounds to the output", i)
				}

				// The device's part with the CPU's added.
				out := make([]uint16, l.T*l.H)
				p = l.problem(out, scratch, cpuPairs)
				p.Addend = addr(partial)
				require.NoError(t, k.Run(p))

				// The reference: the device's experts, the CPU's ones null, the same addend.
				want := make([]uint16, l.T*l.H)
				a := l.args(want, make([]float32, l.T*l.K*l.I))
				for e := 4; e < 8; e++ {
					a.GateUp[e], a.Down[e] = 0, 0
				}
				a.Addend = addr(partial)
				require.NoError(t, backend.NewCPU(1).ReferenceFFN(a))
				if isa == cpuffn.Scalar {
					assert.Equal(t, want, out, "the scalar path adds the addend where the reference does")
				} else {
					assertClose(t, want, out, l.H, f16)
				}
				assertClose(t, l.reference(t), out, l.H, f16)
			})
		}
	}
}

func TestKernelTakesAPartialOutputWithoutOut(t *testing.T) {
	l := newLayer(5, 1, 2, 33, 17, 4, false, dtype.F32)
	k := cpuffn.New(1)
	defer k.Close()
	p := l.problem(nil, make([]float32, 2*l.I), nil)
	p.Out = 0
	assert.Error(t, k.Run(p), "neither Out nor PartialOut")
	partial := make([]float32, l.H)
	p.PartialOut = addr(partial)
	assert.NoError(t, k.Run(p))
}
