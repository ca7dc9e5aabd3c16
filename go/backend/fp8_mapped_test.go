package backend

import (
	"math/rand/v2"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/dtype"
	"github.com/moe-infinity/moe_infinity/go/store"
)

// fp8Source serves hand-made FP8 experts (exps[layer][expert]) as a
// checkpoint does: each matrix and scale grid a host tensor of its own.
type fp8Source struct {
	exps [][]fp8Expert
}

func (s *fp8Source) SlotBytes() int64 { return int64(len(s.exps[0][0].slot)) }

func (s *fp8Source) Fill(l, x int, dst []byte) error {
	copy(dst, s.exps[l][x].slot)
	return nil
}

func (s *fp8Source) Guard(read func() error) error { return store.Guard(read) }

func (s *fp8Source) Segments(l, x int) ([]Segment, bool) { return s.exps[l][x].segs, true }

func (s *fp8Source) Shape() (int, int) { return len(s.exps), len(s.exps[0]) }

// fp8Call is one layer call's inputs: T tokens of H activations, routed to
// K experts each.
type fp8Call struct {
	x   []byte
	ids []int64
	w   []float32
	T   int64
	K   int64
	dt  dtype.DType
}

func newFP8Call(r *rand.Rand, T, K int64, H, E int, dt dtype.DType) fp8Call {
	xs := make([]float32, T*int64(H))
	for i := range xs {
		xs[i] = float32(r.NormFloat64())
	}
	c := fp8Call{x: make([]byte, len(xs)*2), ids: make([]int64, T*K), w: make([]float32, T*K), T: T, K: K, dt: dt}
	_ = dtype.Convert(c.x, dt, f32s(xs), dtype.F32)
	for i := range c.ids {
		c.ids[i], c.w[i] = int64((i*3+1)%E), float32(r.Float64())
	}
	return c
}

// runMapped runs the CPU backend's mapped FFN of layer over c and returns
// the output as float32 and the routing's residency snapshot.
func runMapped(t *testing.T, b *CPU, layer int, q FP8Args, H, I int, c fp8Call) ([]float32, []bool) {
	t.Helper()
	out := make([]byte, len(c.x))
	scratch := make([]float32, c.T*c.K*int64(I))
	a := FFNArgs{X: addr(c.x), Out: addr(out), Scratch: addr(scratch), TopK: addr(c.ids), Weights: addr(c.w),
		T: c.T, K: c.K, Hidden: int64(H), Inter: int64(I), DType: c.dt, WDType: dtype.F32, FP8: &q}
	r, err := b.MappedFFN(layer, a)
	require.NoError(t, err)
	var res []bool
	if r != nil {
		ids, err := r.Wait()
		require.NoError(t, err)
		assert.Equal(t, c.ids, ids)
		res = r.Resident
		r.Done()
	}
	return toF32(out, dtype.BF16), res
}

func TestMappedFP8FFNReadsTheHostTensorsAsTheSlots(t *testing.T) {
	tests := []struct {
		name         string
		H, I, br, bc int
		fused        bool
		scalesFirst  bool
	}{
		{"separate gate and up, partial blocks in rows and columns", 20, 11, 4, 8, false, false},
		{"fused gate_up, one grid: up rows start mid-block", 20, 11, 4, 8, true, false},
		{"fused gate_up, grids before their rows in the slot", 24, 10, 4, 8, true, true},
		{"128x128 blocks, the releases' size, with a partial block", 160, 96, 128, 128, false, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			const L, E, T, K = 2, 4, 2, 2
			r := rand.New(rand.NewPCG(uint64(tc.H), uint64(tc.I)))
			src := &fp8Source{exps: make([][]fp8Expert, L)}
			for l := range src.exps {
				for range E {
					src.exps[l] = append(src.exps[l], makeFP8Expert(t, r, tc.H, tc.I, tc.br, tc.bc, tc.fused, tc.scalesFirst, dtype.BF16))
				}
			}
			lay := src.exps[0][0].lay
			q := src.exps[0][0].args()
			require.True(t, lay.Quantized())
			require.Equal(t, MaxEntries, lay.Entries())

			b := NewCPU(1)
			require.NoError(t, b.Open(E, src.SlotBytes(), src))
			defer b.Close()
			require.NoError(t, b.EnableMapped(lay))

			// want is the layer over the dequantized experts; slotFFN the
			// FFN over tables of the given rows per expert.
			want := func(l int, c fp8Call) []float32 {
				a := FFNArgs{T: c.T, K: c.K, Hidden: int64(tc.H), Inter: int64(tc.I), GateUp: make([]uint64, E), Down: make([]uint64, E)}
				for x, e := range src.exps[l] {
					a.GateUp[x], a.Down[x] = addr(e.gateUpDeq), addr(e.downDeq)
				}
				return runFFN(t, b, a, c.x, c.ids, c.w, dtype.BF16)
			}
			slotFFN := func(c fp8Call, rows func(x int) HostRows) []float32 {
				qq := q
				a := FFNArgs{T: c.T, K: c.K, Hidden: int64(tc.H), Inter: int64(tc.I),
					GateUp: make([]uint64, E), Up: make([]uint64, E), Down: make([]uint64, E), FP8: &qq}
				for x := range E {
					setTables(&a, x, rows(x))
				}
				return runFFN(t, b, a, c.x, c.ids, c.w, dtype.BF16)
			}
			load := func(slot, l, x int) {
				tr := b.Load(slot, l, x, true)
				<-tr.Finished()
				require.NoError(t, tr.Err())
			}

			c0 := newFP8Call(r, T, K, tc.H, E, dtype.BF16)
			w0 := want(0, c0)
			host, res := runMapped(t, b, 0, q, tc.H, tc.I, c0)
			assert.Equal(t, w0, host, "every expert read in place from its host tensors: the dequantized experts' FFN, bit for bit")
			assert.Equal(t, []bool{false, false, false, false}, res)
			assert.NotZero(t, host[0])
			for x := range E {
				load(x, 0, x)
			}
			slots := slotFFN(c0, func(x int) HostRows { return lay.SlotRows(b.SlotAddr(x)) })
			assert.Equal(t, w0, slots, "the slot path over the same experts")
			resident, res := runMapped(t, b, 0, q, tc.H, tc.I, c0)
			assert.Equal(t, w0, resident, "every expert mapped to its slot")
			assert.Equal(t, []bool{true, true, true, true}, res)

			// Layer 1 with two of its experts in slots (evicting layer 0's
			// experts 0 and 1), the others in host memory.
			load(0, 1, 1)
			load(1, 1, 3)
			c1 := newFP8Call(r, T, K, tc.H, E, dtype.BF16)
			w1 := want(1, c1)
			mixed, res := runMapped(t, b, 1, q, tc.H, tc.I, c1)
			assert.Equal(t, w1, mixed, "resident and host experts in one call")
			assert.Equal(t, []bool{false, true, false, true}, res)
			assert.Equal(t, w1, slotFFN(c1, func(x int) HostRows {
				return src.exps[1][x].lay.SlotRows(uintptr(addr(src.exps[1][x].slot)))
			}), "the slot path over slot images")

			// A captured step (the CPU's stand-in for a CUDA graph): both
			// layers computed and their routing staged for the replay.
			require.NoError(t, b.BeginCapture())
			got0, _ := runMapped(t, b, 0, q, tc.H, tc.I, c0)
			got1, _ := runMapped(t, b, 1, q, tc.H, tc.I, c1)
			layers, err := b.EndCapture()
			require.NoError(t, err)
			assert.Equal(t, []CapturedLayer{{Layer: 0, Pairs: T * K, K: K}, {Layer: 1, Pairs: T * K, K: K}}, layers)
			assert.Equal(t, w0, got0)
			assert.Equal(t, w1, got1)
			rt, err := b.ReplayRouting(0, layers)
			require.NoError(t, err)
			ids, err := rt.Wait()
			require.NoError(t, err)
			assert.Equal(t, append(append([]int64(nil), c0.ids...), c1.ids...), ids)
			assert.Equal(t, []bool{false, false, true, true, false, true, false, true}, rt.Resident)
			rt.Done()
		})
	}
}

func TestMappedFFNChecksTheFP8ArgumentsAgainstTheLayout(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	const H, I = 16, 8
	src := &fp8Source{exps: [][]fp8Expert{{makeFP8Expert(t, r, H, I, 4, 8, false, false, dtype.BF16)}}}
	b := NewCPU(1)
	require.NoError(t, b.Open(1, src.SlotBytes(), src))
	defer b.Close()
	require.NoError(t, b.EnableMapped(src.exps[0][0].lay))
	c := newFP8Call(r, 1, 1, H, 1, dtype.BF16)
	out := make([]byte, len(c.x))
	scratch := make([]float32, I)
	a := FFNArgs{X: addr(c.x), Out: addr(out), Scratch: addr(scratch), TopK: addr(c.ids), Weights: addr(c.w), T: 1, K: 1, Hidden: H, Inter: I, DType: dtype.BF16, WDType: dtype.F32}
	_, err := b.MappedFFN(0, a)
	assert.ErrorContains(t, err, "FP8 arguments (false) for tables with scale grids (true)")
}

func TestResolveHostRowsFindsScaleGrids(t *testing.T) {
	buf := make([]byte, 64)
	base := uintptr(unsafe.Pointer(&buf[0]))
	rows := MappedLayout{Gate: 0, Up: 4, Down: 8, RowsBytes: 4, DownBytes: 4}
	q := rows
	q.Scales, q.ScaleBytes = [3]int64{16, 16, 24}, [3]int64{8, 8, 4}
	tests := []struct {
		name string
		l    MappedLayout
		segs []Segment
		ok   bool
		want HostRows
	}{
		{"bfloat16 rows: three entries", rows, []Segment{{Offset: 0, Data: buf[:12]}}, true, HostRows{base, base + 4, base + 8}},
		{"FP8: rows and grids in separate tensors", q, []Segment{{Offset: 0, Data: buf[:12]}, {Offset: 16, Data: buf[32:48]}}, true,
			HostRows{base, base + 4, base + 8, base + 32, base + 32, base + 40}},
		{"a grid missing from host memory", q, []Segment{{Offset: 0, Data: buf[:12]}, {Offset: 16, Data: buf[32:40]}}, false, HostRows{}},
		{"a grid that is not float32-aligned", q, []Segment{{Offset: 0, Data: buf[:12]}, {Offset: 16, Data: buf[33:49]}}, false, HostRows{}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := ResolveHostRows(tc.l, tc.segs)
			require.Equal(t, tc.ok, ok)
			if ok {
				assert.Equal(t, tc.want, got)
			}
		})
	}
	assert.Equal(t, 3, rows.Entries())
	assert.Equal(t, HostRows{100, 104, 108}, rows.SlotRows(100))
	assert.Equal(t, HostRows{100, 104, 108, 116, 116, 124}, q.SlotRows(100))
}
