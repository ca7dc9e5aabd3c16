package backend

import (
	"encoding/binary"
	"math"
	"math/rand/v2"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/dtype"
	"github.com/moe-infinity/moe_infinity/go/quant"
)

// fp8Expert is one hand-made FP8 expert: its slot bytes, the same bytes as
// the separate host tensors a checkpoint keeps (segs: each matrix and each
// scale grid on its own, at their slot offsets), where the matrices and
// grids are in the slot, and the same expert dequantized (what the views
// of the host path hold).
type fp8Expert struct {
	slot               []byte
	segs               []Segment
	lay                MappedLayout
	upRow0             int64
	block              [2]int64
	gateUpDeq, downDeq []byte // [2I, H] and [H, I] in the activation dtype
}

// args are the FP8 arguments without tables.
func (e fp8Expert) args() FP8Args {
	return FP8Args{BlockRows: e.block[0], BlockCols: e.block[1], UpRow0: e.upRow0}
}

// setTables points a's expert x at r (a.FP8's tables made when nil).
func setTables(a *FFNArgs, x int, r HostRows) {
	a.GateUp[x], a.Up[x], a.Down[x] = uint64(r[EntryGate]), uint64(r[EntryUp]), uint64(r[EntryDown])
	q := a.FP8
	if q.GateScale == nil {
		n := len(a.GateUp)
		q.GateScale, q.UpScale, q.DownScale = make([]uint64, n), make([]uint64, n), make([]uint64, n)
	}
	q.GateScale[x], q.UpScale[x], q.DownScale[x] = uint64(r[EntryGateScale]), uint64(r[EntryUpScale]), uint64(r[EntryDownScale])
}

func f32s(v []float32) []byte {
	b := make([]byte, 4*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(x))
	}
	return b
}

// randFP8 returns n float8_e4m3fn bytes, NaN (0x7F, 0xFF) excluded.
func randFP8(r *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		for b[i] = byte(r.IntN(256)); b[i]&0x7f == 0x7f; b[i] = byte(r.IntN(256)) {
		}
	}
	return b
}

// randScales returns a scale grid of powers of two and odd values, so that
// the product with the fp8 value needs rounding to bfloat16.
func randScales(r *rand.Rand, n int) []float32 {
	s := make([]float32, n)
	for i := range s {
		s[i] = float32(r.Float64()*0.02 + 1e-4)
	}
	return s
}

// makeFP8Expert lays out gate and up ([I, H]) and down ([H, I]) as FP8 with
// block [br, bc]: fused puts gate and up in one [2I, H] weight with one
// grid (as a fused checkpoint does), scalesFirst puts every grid before its
// rows in the slot.
func makeFP8Expert(t *testing.T, r *rand.Rand, H, I, br, bc int, fused, scalesFirst bool, dt dtype.DType) fp8Expert {
	t.Helper()
	blk := quant.Block{Rows: br, Cols: bc}
	var slot []byte
	var segs []Segment
	type mat struct {
		rows, cols int
		w          []byte
		s          []float32
		off        int64 // rows' offset in slot
		scaleOff   int64
		scaleBytes int64
	}
	put := func(b []byte) int64 {
		for len(slot)%16 != 0 {
			slot = append(slot, 0xee)
		}
		off := int64(len(slot))
		slot = append(slot, b...)
		segs = append(segs, Segment{Offset: off, Data: append([]byte(nil), b...)})
		return off
	}
	place := func(rows, cols int) *mat {
		sr, sc := blk.ScaleGrid(rows, cols)
		m := &mat{rows: rows, cols: cols, w: randFP8(r, rows*cols), s: randScales(r, sr*sc)}
		sb := f32s(m.s)
		m.scaleBytes = int64(len(sb))
		if scalesFirst {
			m.scaleOff = put(sb)
			m.off = put(m.w)
		} else {
			m.off = put(m.w)
			m.scaleOff = put(sb)
		}
		return m
	}
	deq := func(m *mat) []byte {
		out := make([]byte, m.rows*m.cols*dt.Size())
		require.NoError(t, quant.DequantFP8Block(out, dt, m.w, f32s(m.s), dtype.F32, m.rows, m.cols, blk))
		return out
	}
	e := fp8Expert{block: [2]int64{int64(br), int64(bc)}}
	l := MappedLayout{RowsBytes: int64(I * H), DownBytes: int64(H * I)}
	if fused {
		gu := place(2*I, H)
		l.Gate, l.Up, e.upRow0 = gu.off, gu.off+int64(I*H), int64(I)
		l.Scales[0], l.Scales[1] = gu.scaleOff, gu.scaleOff
		l.ScaleBytes[0], l.ScaleBytes[1] = gu.scaleBytes, gu.scaleBytes
		e.gateUpDeq = deq(gu)
	} else {
		g, u := place(I, H), place(I, H)
		l.Gate, l.Up = g.off, u.off
		l.Scales[0], l.Scales[1] = g.scaleOff, u.scaleOff
		l.ScaleBytes[0], l.ScaleBytes[1] = g.scaleBytes, u.scaleBytes
		e.gateUpDeq = append(deq(g), deq(u)...)
	}
	d := place(H, I)
	l.Down, l.Scales[2], l.ScaleBytes[2] = d.off, d.scaleOff, d.scaleBytes
	e.downDeq = deq(d)
	e.slot, e.segs, e.lay = slot, segs, l
	return e
}

// escaped keeps what addr was given on the heap: a slice whose address
// is handed to the FFN as an integer must not live on a stack that moves.
var escaped []any

// addr returns the address of s's first element (s moves to the heap).
func addr[T any](s []T) uint64 {
	escaped = append(escaped, s)
	return uint64(uintptr(unsafe.Pointer(&s[0])))
}

// runFFN runs the CPU backend's FFN over T tokens, K experts each, and
// returns the output as float32.
func runFFN(t *testing.T, c *CPU, a FFNArgs, x []byte, ids []int64, w []float32, dt dtype.DType) []float32 {
	t.Helper()
	out := make([]byte, len(x))
	scratch := make([]float32, a.T*a.K*a.Inter)
	a.X, a.Out, a.Scratch, a.TopK, a.Weights = addr(x), addr(out), addr(scratch), addr(ids), addr(w)
	a.DType, a.WDType = dt, dtype.F32
	require.NoError(t, c.FFN(a))
	return toF32(out, dt)
}

func TestReferenceFFNReadsFP8SlotsAsTheDequantizedExperts(t *testing.T) {
	tests := []struct {
		name              string
		H, I, br, bc      int
		fused, scalesLast bool
		dt                dtype.DType
		T, K              int64
		simd              int
	}{
		{"whole blocks, separate gate and up", 16, 8, 4, 8, false, true, dtype.BF16, 1, 2, 0},
		{"partial last blocks in rows and columns", 20, 11, 4, 8, false, true, dtype.BF16, 2, 2, 0},
		{"fused gate_up: up rows start mid-block in the shared grid", 20, 11, 4, 8, true, true, dtype.BF16, 3, 2, 0},
		{"scale grids before their rows", 20, 11, 4, 8, false, false, dtype.BF16, 1, 3, 0},
		{"float16 activations", 24, 12, 8, 16, true, false, dtype.F16, 2, 2, 0},
		{"128x128 blocks, the releases' size, with a partial block", 160, 96, 128, 128, false, true, dtype.BF16, 2, 2, 0},
		{"SIMD kernels on: FP8 calls fall back to the reference", 20, 11, 4, 8, false, true, dtype.BF16, 2, 2, 2},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := rand.New(rand.NewPCG(uint64(tc.H), uint64(tc.I)))
			const E = 3
			exps := make([]fp8Expert, E)
			a := FFNArgs{T: tc.T, K: tc.K, Hidden: int64(tc.H), Inter: int64(tc.I),
				GateUp: make([]uint64, E), Up: make([]uint64, E), Down: make([]uint64, E)}
			deq := FFNArgs{T: tc.T, K: tc.K, Hidden: int64(tc.H), Inter: int64(tc.I),
				GateUp: make([]uint64, E), Down: make([]uint64, E)}
			for e := range exps {
				exps[e] = makeFP8Expert(t, r, tc.H, tc.I, tc.br, tc.bc, tc.fused, !tc.scalesLast, tc.dt)
			}
			args := exps[0].args()
			a.FP8 = &args
			for e := range exps {
				setTables(&a, e, exps[e].lay.SlotRows(uintptr(addr(exps[e].slot))))
				deq.GateUp[e], deq.Down[e] = addr(exps[e].gateUpDeq), addr(exps[e].downDeq)
			}
			x := make([]byte, tc.T*int64(tc.H)*2)
			xs := make([]float32, tc.T*int64(tc.H))
			for i := range xs {
				xs[i] = float32(r.NormFloat64())
			}
			require.NoError(t, dtype.Convert(x, tc.dt, f32s(xs), dtype.F32))
			ids := make([]int64, tc.T*tc.K)
			w := make([]float32, tc.T*tc.K)
			for i := range ids {
				ids[i], w[i] = int64((i*2+1)%E), float32(r.Float64())
			}
			c := NewCPU(1)
			c.ExpertThreads = tc.simd
			require.NoError(t, c.Open(1, 64, &patternSource{size: 64}))
			defer c.Close()
			got := runFFN(t, c, a, x, ids, w, tc.dt)
			want := runFFN(t, c, deq, x, ids, w, tc.dt)
			assert.Equal(t, want, got, "FP8 slots read in place compute what the dequantized experts do, bit for bit")
			assert.NotZero(t, got[0])
		})
	}
}

func TestReferenceFFNFP8KnownValues(t *testing.T) {
	// One expert, I = 1, H = 3, block [1, 2]: columns 0-1 share a scale,
	// column 2 is a partial block with its own. fp8 0x38 is 1.0, 0x40 2.0.
	const H, I = 3, 1
	gate := []byte{0x38, 0x38, 0x40} // × scales {1, 0.5}: [1, 1, 1]
	up := []byte{0x38, 0x00, 0x00}   // × {0.25, 1}: [0.25, 0, 0]
	down := []byte{0x40, 0x38, 0x38} // [H, I] = 3 rows of one column, block rows of 1: × {1, 2, 0.5}
	slot := append(append(append([]byte{}, gate...), up...), down...)
	scales := f32s([]float32{1, 0.5, 0.25, 1, 1, 2, 0.5}) // gate [1, 2], up [1, 2], down [3, 1]
	x := make([]byte, H*2)
	require.NoError(t, dtype.Convert(x, dtype.BF16, f32s([]float32{1, 1, 2}), dtype.F32))
	base, sbase := addr(slot), addr(scales)
	a := FFNArgs{T: 1, K: 1, Hidden: H, Inter: I,
		GateUp: []uint64{base}, Up: []uint64{base + 3}, Down: []uint64{base + 6},
		FP8: &FP8Args{BlockRows: 1, BlockCols: 2, GateScale: []uint64{sbase}, UpScale: []uint64{sbase + 8}, DownScale: []uint64{sbase + 16}}}
	c := NewCPU(1)
	got := runFFN(t, c, a, x, []int64{0}, []float32{1}, dtype.BF16)
	// g = 1+1+2 = 4, u = 0.25; silu(4) = 3.9281 → bf16 3.921875; h = 0.98046875;
	// down rows: 2·1, 1·2, 1·0.5 → out = [1.9609375, 1.9609375, 0.490234375].
	assert.Equal(t, []float32{1.9609375, 1.9609375, 0.49023438}, got)
}

func TestFP8ArgsValidate(t *testing.T) {
	base := FFNArgs{X: 1, Out: 1, Scratch: 1, TopK: 1, Weights: 1, T: 1, K: 1, Hidden: 4, Inter: 4, DType: dtype.BF16, WDType: dtype.F32, GateUp: []uint64{1}, Down: []uint64{1}}
	one := []uint64{2}
	tests := []struct {
		name string
		q    FP8Args
		err  string
	}{
		{"good", FP8Args{BlockRows: 128, BlockCols: 128, GateScale: one, UpScale: one, DownScale: one}, ""},
		{"up rows after gate in a fused grid", FP8Args{BlockRows: 128, BlockCols: 128, UpRow0: 4, GateScale: one, UpScale: one, DownScale: one}, ""},
		{"zero block", FP8Args{BlockRows: 0, BlockCols: 128, GateScale: one, UpScale: one, DownScale: one}, "weight_block_size"},
		{"up rows elsewhere", FP8Args{BlockRows: 1, BlockCols: 1, UpRow0: 3, GateScale: one, UpScale: one, DownScale: one}, "want 0 or inter"},
		{"no scale tables", FP8Args{BlockRows: 128, BlockCols: 128}, "scale tables of 0, 0 and 0 experts (want 1"},
		{"a scale table short", FP8Args{BlockRows: 128, BlockCols: 128, GateScale: one, UpScale: one, DownScale: []uint64{}}, "scale tables"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			a := base
			a.FP8 = &tc.q
			err := a.Validate()
			if tc.err == "" {
				require.NoError(t, err)
				assert.Equal(t, int64(1), a.WeightSize())
				assert.Equal(t, uint64(1+16), a.UpAddr(0), "FP8 up rows follow gate's at one byte an element")
				return
			}
			assert.ErrorContains(t, err, tc.err)
		})
	}
}
