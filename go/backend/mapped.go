package backend

import (
	"errors"
	"fmt"
	"sync"
	"unsafe"

	"github.com/moe-infinity/moe_infinity/go/dtype"
)

// MappedLayout locates an expert's FFN rows inside its slot image, for
// mapped mode, and for FP8 experts their scale grids: each region is one
// entry of the expert's tables (see the Entry constants). Offsets and sizes
// are in bytes.
type MappedLayout struct {
	// Gate, Up and Down are the offsets of the gate rows [Inter, Hidden],
	// the up rows [Inter, Hidden] and down [Hidden, Inter].
	Gate, Up, Down int64
	// RowsBytes is the size of the gate rows (and of the up rows);
	// DownBytes the size of down.
	RowsBytes, DownBytes int64
	// Scales are the offsets of the gate, up and down matrices' float32
	// scale grids (FFNArgs.FP8) and ScaleBytes their sizes; all zero for
	// bfloat16/float16 experts. Gate and up name one grid when they are the
	// halves of one fused weight (FP8Args.UpRow0).
	Scales, ScaleBytes [3]int64
	// GptOss: the expert is gpt-oss's (FFNArgs.GptOss) and its entries are
	// the EntryOss ones: gate_up (Gate, RowsBytes: [H, 2I] in the
	// activation dtype, or MXFP4 blocks [2I, H/32, 16]), its bias
	// (Biases[0]), down (Down, DownBytes: [I, H], or blocks [H, I/32, 16]),
	// its bias (Biases[1]), then for MXFP4 experts the e8m0 scales of
	// gate_up and down (Scales[0], Scales[2]; Up and Scales[1] unused).
	GptOss bool
	// Biases are the offsets of gate_up_proj_bias and down_proj_bias and
	// BiasBytes their sizes (GptOss only).
	Biases, BiasBytes [2]int64
}

// A gpt-oss expert's entries (MappedLayout.GptOss), in the order of its
// HostRows and of the backends' tables: as many as an FP8 expert's at
// most.
const (
	EntryOssGateUp = iota
	EntryOssGateUpBias
	EntryOssDown
	EntryOssDownBias
	EntryOssGateUpScale
	EntryOssDownScale
)

// Table entries of an expert, in the order of HostRows and of the
// backends' device tables.
const (
	EntryGate = iota
	EntryUp
	EntryDown
	EntryGateScale
	EntryUpScale
	EntryDownScale
	// MaxEntries is the most entries an expert has (FP8 experts).
	MaxEntries
)

// ScaleAlign is the alignment in bytes a scale grid needs in host memory
// to be read in place: the kernels load each scale as one float32.
const ScaleAlign = 4

// Quantized reports whether l has scale grids (FP8 experts, or MXFP4
// gpt-oss experts).
func (l MappedLayout) Quantized() bool { return l.ScaleBytes[0] > 0 }

// FP8 reports whether l's experts are FP8 block-scaled SwiGLU ones.
func (l MappedLayout) FP8() bool { return l.Quantized() && !l.GptOss }

// Entries is the number of table entries of one expert: gate, up and
// down rows, then (FP8 experts) their scale grids; for gpt-oss experts
// the EntryOss ones.
func (l MappedLayout) Entries() int { return len(l.regions()) }

// region is one entry's place in the slot image and the alignment its
// host memory needs to be read in place.
type region struct{ off, n, align int64 }

// regions are the entries, in order.
func (l MappedLayout) regions() []region {
	if l.GptOss {
		rowAlign := int64(2) // bfloat16/float16 elements; MXFP4 bytes (the kernels check for 16-byte rows)
		if l.Quantized() {
			rowAlign = 1
		}
		r := []region{{l.Gate, l.RowsBytes, rowAlign}, {l.Biases[0], l.BiasBytes[0], 2}, {l.Down, l.DownBytes, rowAlign}, {l.Biases[1], l.BiasBytes[1], 2}}
		if l.Quantized() {
			r = append(r, region{l.Scales[0], l.ScaleBytes[0], 1}, region{l.Scales[2], l.ScaleBytes[2], 1})
		}
		return r
	}
	r := []region{{l.Gate, l.RowsBytes, 1}, {l.Up, l.RowsBytes, 1}, {l.Down, l.DownBytes, 1}}
	if l.Quantized() {
		for j := range l.Scales {
			r = append(r, region{l.Scales[j], l.ScaleBytes[j], ScaleAlign})
		}
	}
	return r
}

// CheckArgs checks that a mapped call's arguments describe l's experts:
// a.FP8 exactly for FP8 experts, a.GptOss exactly for gpt-oss ones, with
// MXFP4 exactly when they have scales.
func (l MappedLayout) CheckArgs(a FFNArgs) error {
	switch {
	case (a.FP8 != nil) != l.FP8():
		return fmt.Errorf("mapped FFN: FP8 arguments (%t) for tables with scale grids (%t)", a.FP8 != nil, l.FP8())
	case (a.GptOss != nil) != l.GptOss:
		return fmt.Errorf("mapped FFN: gpt-oss arguments (%t) for tables of gpt-oss experts (%t)", a.GptOss != nil, l.GptOss)
	case a.GptOss != nil && a.GptOss.MXFP4 != l.Quantized():
		return fmt.Errorf("mapped FFN: gpt-oss MXFP4 arguments (%t) for tables with scales (%t)", a.GptOss.MXFP4, l.Quantized())
	}
	return nil
}

// Tables fills a's tables (and a.FP8's or a.GptOss's, copied first) for E
// experts, expert x's entries being rows(x).
func (l MappedLayout) Tables(a FFNArgs, E int, rows func(x int) HostRows) FFNArgs {
	a.GateUp, a.Down = make([]uint64, E), make([]uint64, E)
	if q := a.GptOss; q != nil {
		qq := *q
		qq.GateUpBias, qq.DownBias = make([]uint64, E), make([]uint64, E)
		qq.GateUpScale, qq.DownScale = nil, nil
		if qq.MXFP4 {
			qq.GateUpScale, qq.DownScale = make([]uint64, E), make([]uint64, E)
		}
		a.Up, a.GptOss = nil, &qq
		for x := range E {
			r := rows(x)
			a.GateUp[x], qq.GateUpBias[x], a.Down[x], qq.DownBias[x] = uint64(r[EntryOssGateUp]), uint64(r[EntryOssGateUpBias]), uint64(r[EntryOssDown]), uint64(r[EntryOssDownBias])
			if qq.MXFP4 {
				qq.GateUpScale[x], qq.DownScale[x] = uint64(r[EntryOssGateUpScale]), uint64(r[EntryOssDownScale])
			}
		}
		return a
	}
	a.Up = make([]uint64, E)
	if a.FP8 != nil {
		q := *a.FP8
		q.GateScale, q.UpScale, q.DownScale = make([]uint64, E), make([]uint64, E), make([]uint64, E)
		a.FP8 = &q
	}
	for x := range E {
		r := rows(x)
		a.GateUp[x], a.Up[x], a.Down[x] = uint64(r[EntryGate]), uint64(r[EntryUp]), uint64(r[EntryDown])
		if q := a.FP8; q != nil {
			q.GateScale[x], q.UpScale[x], q.DownScale[x] = uint64(r[EntryGateScale]), uint64(r[EntryUpScale]), uint64(r[EntryDownScale])
		}
	}
	return a
}

// SlotRows are the entries of an expert held by the slot at base.
func (l MappedLayout) SlotRows(base uintptr) HostRows {
	var out HostRows
	for j, r := range l.regions() {
		out[j] = base + uintptr(r.off)
	}
	return out
}

// Routing is the host copy of one mapped launch's routing.
type Routing struct {
	// Resident[x] is true when expert x of the layer was mapped to its
	// cache slot at launch (a hit); false means it was read from host
	// memory (a miss).
	Resident []bool
	wait     func() ([]int64, error)
	done     func()
	once     sync.Once
}

// NewRouting returns a Routing whose ids come from wait (valid until done
// runs).
func NewRouting(resident []bool, wait func() ([]int64, error), done func()) *Routing {
	return &Routing{Resident: resident, wait: wait, done: done}
}

// Wait blocks until the routing is in host memory and returns the T·K
// expert ids; they stay valid until Done.
func (r *Routing) Wait() ([]int64, error) { return r.wait() }

// Done gives the routing's buffer back. Idempotent.
func (r *Routing) Done() {
	r.once.Do(func() {
		if r.done != nil {
			r.done()
		}
	})
}

// Mapped is implemented by backends whose kernels read each expert from
// wherever it is: its cache slot when resident, otherwise its host memory
// in place (over PCIe on a GPU). A layer then computes without the host
// knowing its routing in advance: no copy is waited for, nothing is
// pinned, and the routing reaches the host asynchronously for tracing.
//
// In mapped mode Load keeps the per-layer expert tables in step: the
// slot's previous expert is pointed back at host memory (ordered after
// every computation submitted so far) before the copy starts, and the new
// expert is pointed at the slot once the copy is complete.
type Mapped interface {
	// EnableMapped turns mapped mode on. It fails when some expert's rows
	// (or scale grids, for FP8 experts: l.Quantized; biases and scales, for
	// gpt-oss experts: l.GptOss) are not contiguous host memory the backend
	// can read in place.
	EnableMapped(l MappedLayout) error
	// MappedFFN computes MoE layer `layer`'s expert FFN (a's tables, and
	// a.FP8's or a.GptOss's, are ignored: the layer's own are used; a.FP8
	// is set exactly when the layout is FP8's, a.GptOss exactly when it is
	// gpt-oss's, with MXFP4 exactly when it has scales) and starts copying
	// the routing (a.T·a.K ids at a.TopK) to host memory. It returns
	// without waiting for either.
	MappedFFN(layer int, a FFNArgs) (*Routing, error)
	// UnmapAll points every expert back at host memory, ordered after the
	// computations submitted so far (for a cache flush).
	UnmapAll() error
}

// CapturedLayer is one MappedFFN call recorded during a graph capture.
type CapturedLayer struct {
	// Layer is the MoE layer; Pairs its T·K (token, expert) pairs; K the
	// experts per token.
	Layer int
	Pairs int64
	K     int64
}

// Graphs is implemented by mapped backends whose layers can be captured
// in a CUDA graph and replayed: nothing a mapped layer submits depends on
// the host, so a whole decode step replays with one launch.
type Graphs interface {
	// BeginCapture precedes the capture of mapped layers on one stream:
	// copies (whose table updates would otherwise join the graph) wait
	// until EndCapture, and MappedFFN stages each layer's routing on the
	// device, returning a nil Routing.
	BeginCapture() error
	// EndCapture ends the capture and returns the layers captured.
	EndCapture() ([]CapturedLayer, error)
	// ReplayRouting copies the staged routing of the captured layers to
	// host memory after the work submitted to stream so far (a replay): the
	// ids of layers[i] follow those of layers[i-1], and Resident holds
	// each layer's snapshot (len(layers) × experts) in the same order.
	ReplayRouting(stream uintptr, layers []CapturedLayer) (*Routing, error)
}

// SlotLoad is one expert to copy into a slot in copy mode.
type SlotLoad struct {
	Slot, Layer, Expert int
}

// ErrLate is returned by AwaitLayer when a replayed layer stopped waiting
// for the engine (the backend's timeout passed): the layer went on reading
// its missed experts in place, so its results are right, but the engine
// has lost track of the replay.
var ErrLate = errors.New("backend: a replayed layer timed out waiting for its copies")

// CopyGraphs is implemented by Graphs backends that can capture layers in
// copy mode: each captured layer publishes its routing to the host as the
// replay reaches it and then waits (inside the replay, on the device) until
// the engine has had the layer's missed experts copied into slots by the
// copy engine, so misses move at DMA speed instead of being read in place
// by the kernels. A layer that waits longer than the backend's timeout
// goes on reading its misses in place (its table entries always point at
// valid memory) and AwaitLayer reports ErrLate.
type CopyGraphs interface {
	Graphs
	// SetCopyMode selects copy mode (or not) for the captures that follow.
	SetCopyMode(on bool) error
	// AwaitLayer blocks until captured layer i (its index in the capture)
	// of the next replay has published its routing, and returns the ids
	// (valid until ServeLayer) and the sequence number to answer. It
	// returns ErrClosed when stop is closed first.
	AwaitLayer(i int, stop <-chan struct{}) (ids []int64, seq uint64, err error)
	// ServeLayer copies each load's expert into its slot, in order on the
	// copy stream (the slot's old expert is pointed back at host memory
	// before the copy, the new one at the slot after it), then lets
	// captured layer i of replay seq run. Readers of the slots' old
	// experts must all be ordered before the replay.
	ServeLayer(i int, seq uint64, loads []SlotLoad) error
}

// CopyHandOff is implemented by CopyGraphs backends whose copy-mode
// captured layers can hand some of their missed experts to the CPU inside
// a replay (hybrid execution with no host call in the replay). With it on
// (SetCopyHandOff before BeginCapture), each captured layer also publishes
// its activations and routing weights, beside its routing, to a mailbox in
// host memory the device writes, and reads a skip list and a float32
// partial output [T, Hidden] from host memory. Serving the layer, the
// engine names the experts whose pairs the CPU computed into the partial
// (ServeLayerCPU), and the answer comes after the loads' copies and the
// partial. The layer's kernels skip the named experts' pairs and add the
// partial only when its wait ended with the answer: a layer that timed out
// ignores both and reads every miss in place, which is right because the
// CPU's experts keep their table entries (host memory).
type CopyHandOff interface {
	CopyGraphs
	// SetCopyHandOff selects the mailbox for the copy-mode captures that
	// follow: it holds up to tokens tokens per captured layer of hidden
	// elements each (a layer with more tokens is captured without one);
	// tokens 0 turns it off.
	SetCopyHandOff(tokens, hidden int64) error
	// LayerWork returns the mailbox of captured layer i's publication that
	// AwaitLayer returned last: the host addresses of its activations (as
	// the kernels read them: [T, Hidden] of the experts' dtype), its
	// routing weights ([T, K] of type wdtype: dtype.F32, BF16 or F16) and the
	// partial output the CPU writes (float32 [T, Hidden]), valid until the
	// layer is served. ok is false when layer i has no mailbox.
	LayerWork(i int) (w HostWork, wdtype dtype.DType, ok bool)
	// ServeLayerCPU is ServeLayer for a layer whose experts cpu (distinct
	// ids) the CPU computes: it issues the loads' copies, then calls
	// partial, which returns once the CPU has written the sum of those
	// experts' pairs to the partial output (or failed); then it puts cpu
	// on the layer's skip list (or, when partial failed, leaves the list
	// empty, so the layer reads them in place) and answers. It returns
	// partial's error, else ServeLayer's. With cpu empty it is ServeLayer
	// (and the skip list is empty).
	ServeLayerCPU(i int, seq uint64, loads []SlotLoad, cpu []int32, partial func() error) error
}

// Timed is implemented by backends that account host time of their own
// (in nanoseconds, by name); the engine reports it with its phases.
type Timed interface {
	PhaseNs() map[string]int64
	ResetPhases()
}

// HostRows is one expert's table entries (addresses, indexed by the
// Entry constants, or the EntryOss ones for gpt-oss experts): its gate, up
// and down rows and, for FP8 experts, their scale grids; unused entries
// are 0.
type HostRows [MaxEntries]uintptr

// ResolveHostRows finds each region of l inside one segment of segs. A
// scale grid must also be ScaleAlign-aligned there, gpt-oss's bfloat16
// matrices and biases 2-byte aligned.
func ResolveHostRows(l MappedLayout, segs []Segment) (HostRows, bool) {
	var out HostRows
	for i, r := range l.regions() {
		for _, s := range segs {
			if r.off >= s.Offset && r.off+r.n <= s.Offset+int64(len(s.Data)) && len(s.Data) > 0 {
				out[i] = uintptr(unsafe.Pointer(&s.Data[r.off-s.Offset]))
				break
			}
		}
		if out[i] == 0 || out[i]%uintptr(r.align) != 0 {
			return out, false
		}
	}
	return out, true
}

// MapTable is the host side of mapped mode, shared by the backends: which
// slot each expert is mapped to and where every expert is in host memory.
// Mu guards Owner and Resident.
type MapTable struct {
	Mu      sync.RWMutex
	Lay     MappedLayout
	Layers  int
	Experts int
	// Host[i] are expert i's entries in host memory (i = layer*Experts+expert).
	Host []HostRows
	// Owner[slot] is the expert mapped to slot, or -1.
	Owner []int
	// Resident[i] is the slot expert i is mapped to, or -1.
	Resident []int32
}

// NewMapTable resolves every expert's host rows; nothing is mapped.
func NewMapTable(l MappedLayout, slots, layers, experts int, rows func(layer, expert int) (HostRows, bool)) (*MapTable, error) {
	m := &MapTable{Lay: l, Layers: layers, Experts: experts, Host: make([]HostRows, layers*experts), Owner: make([]int, slots), Resident: make([]int32, layers*experts)}
	for i := range m.Owner {
		m.Owner[i] = -1
	}
	for i := range m.Host {
		m.Resident[i] = -1
		r, ok := rows(i/experts, i%experts)
		if !ok {
			return nil, fmt.Errorf("expert L%d/E%d's FFN rows (and scale grids) are not contiguous host memory that can be read in place", i/experts, i%experts)
		}
		m.Host[i] = r
	}
	return m, nil
}

// Snapshot is which of layer's experts are mapped to slots (call with Mu
// held).
func (m *MapTable) Snapshot(layer int) []bool {
	out := make([]bool, m.Experts)
	base := layer * m.Experts
	for x := range out {
		out[x] = m.Resident[base+x] >= 0
	}
	return out
}

// Unmap drops slot's expert (call with Mu held) and returns it, or -1
// when the slot held none or its expert has since been mapped to another
// slot. The latter happens when the cache evicts an expert and loads it
// again elsewhere before the copy that replaces it here begins: the
// expert stays mapped where it now is (the caller must not point it back
// at host memory), or it would be read over the link while resident.
func (m *MapTable) Unmap(slot int) int {
	o := m.Owner[slot]
	if o < 0 {
		return -1
	}
	m.Owner[slot] = -1
	if m.Resident[o] != int32(slot) {
		return -1
	}
	m.Resident[o] = -1
	return o
}

// Map maps expert i to slot (call with Mu held).
func (m *MapTable) Map(slot, i int) {
	m.Owner[slot] = i
	m.Resident[i] = int32(slot)
}

// Rows are the addresses expert i is read from: its slot's regions
// (slotAddr(slot)) when mapped, its host rows otherwise (call with Mu held).
func (m *MapTable) Rows(i int, slotAddr func(slot int) uintptr) HostRows {
	if s := m.Resident[i]; s >= 0 {
		return m.Lay.SlotRows(slotAddr(int(s)))
	}
	return m.Host[i]
}
