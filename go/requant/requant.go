// Package requant writes a compressed copy of a checkpoint's routed experts:
// block FP8 as DeepSeek-V3 ships it (float8_e4m3fn weights, a float32
// weight_scale_inv per weight_block_size block; quant.QuantFP8Block), in
// safetensors shards with a model.safetensors.index.json that store.Open
// reads as a checkpoint of FP8 experts. moe_infinity's expert_dtype="fp8"
// writes it once into the offload directory and serves the experts from it
// exactly as it serves FP8 checkpoints.
//
// What is written: every routed expert tensor (store.Checkpoint.Experts) of
// the source, under its own name. A weight matrix (2-D per expert, a
// per-expert role ending in ".weight" or any fused role) becomes
// float8_e4m3fn with its scales beside it ("<name>.weight_scale_inv" per
// expert, "<role>_scale_inv" [E, rows/b0, cols/b1] fused: the names
// store.QuantFormat pairs); anything else (biases) is copied as it is. Each
// MoE module gets one shard.
//
// A copy is reused only when its manifest (ManifestName, written last)
// matches the request: the caller's key for the source version, the source
// files' names, sizes and modification times, the block size, and every
// shard present with its size. Every file is written to a temporary name,
// synced and renamed, and a rewrite removes the manifest first, so a run
// that stops half way never leaves a copy that is later trusted.
package requant

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strings"
	"sync"

	"github.com/moe-infinity/moe_infinity/go/dtype"
	"github.com/moe-infinity/moe_infinity/go/quant"
	"github.com/moe-infinity/moe_infinity/go/store"
)

// ManifestName is the file, in the output directory, that records what
// the copy was made from; it is written last.
const ManifestName = "moe_infinity-fp8.json"

// FormatVersion is the manifest's format; a copy of another version is
// rewritten.
const FormatVersion = 1

// DefaultBlock is the weight_block_size written when Options.Block is
// zero: 128 × 128, as DeepSeek-V3/R1 and the Qwen3 FP8 releases ship.
var DefaultBlock = quant.Block{Rows: 128, Cols: 128}

// ErrSource marks a source whose experts cannot be compressed (none, or
// not float: already quantized).
var ErrSource = errors.New("the checkpoint's experts cannot be compressed to FP8")

// Options says what to compress and where.
type Options struct {
	// Source is the checkpoint: anything store.Open accepts.
	Source string
	// Dir is the output directory (created if needed). It belongs to the
	// copy: stale shards and temporary files in it are removed.
	Dir string
	// Key identifies the source's version (the caller's fingerprint); a
	// copy made under another key is rewritten.
	Key string
	// Block is the FP8 weight_block_size; zero means DefaultBlock.
	Block quant.Block
	// Workers is the number of goroutines quantizing; 0 means GOMAXPROCS.
	Workers int
	// Progress, if not nil, is told the source expert bytes done of the
	// total as the work goes (serialised; done only grows).
	Progress func(done, total int64)
}

// Result describes the copy.
type Result struct {
	// Reused reports that a valid copy was found and nothing was written.
	Reused bool `json:"reused"`
	// Dir is the copy's directory, a checkpoint for store.Open.
	Dir string `json:"dir"`
	// QuantMethod is "fp8", the quantization_config quant_method served.
	QuantMethod string `json:"quant_method"`
	// WeightBlockSize is the block [rows, cols] of the scales.
	WeightBlockSize [2]int `json:"weight_block_size"`
	// Files is the number of shards.
	Files int `json:"files"`
	// Tensors is the number of tensors written (weights, scales, copies).
	Tensors int `json:"tensors"`
	// Quantized is the number of weight tensors quantized (a fused tensor
	// counts once).
	Quantized int `json:"quantized"`
	// Bytes is the size of the shards' tensor data in bytes.
	Bytes int64 `json:"bytes"`
	// SourceBytes is the size of the source's expert tensors in bytes.
	SourceBytes int64 `json:"source_bytes"`
}

// fileStamp is a file's name with its size (and, for sources, its
// modification time).
type fileStamp struct {
	Name    string `json:"name"`
	Size    int64  `json:"size"`
	MtimeNs int64  `json:"mtime_ns,omitempty"`
}

type manifest struct {
	Format  int         `json:"format"`
	Key     string      `json:"key"`
	Sources []fileStamp `json:"sources"`
	Files   []fileStamp `json:"files"`
	Result  Result      `json:"result"`
}

// settle fills a zero block with DefaultBlock and a non-positive worker
// count with GOMAXPROCS, and refuses a block with a non-positive side.
func settle(block *quant.Block, workers *int) error {
	if *block == (quant.Block{}) {
		*block = DefaultBlock
	}
	if block.Rows <= 0 || block.Cols <= 0 {
		return fmt.Errorf("requant: weight_block_size [%d, %d] must be positive", block.Rows, block.Cols)
	}
	if *workers <= 0 {
		*workers = runtime.GOMAXPROCS(0)
	}
	return nil
}

// FP8 makes (or finds) the block-FP8 copy of opts.Source's routed experts
// in opts.Dir. Errors: ErrSource for a source without float experts,
// store's errors for an unreadable source, *fs.PathError for a directory
// that cannot be written.
func FP8(opts Options) (Result, error) {
	if err := settle(&opts.Block, &opts.Workers); err != nil {
		return Result{}, err
	}
	if sameDir(opts.Dir, opts.Source) {
		return Result{}, fmt.Errorf("requant: the output directory %s is the checkpoint's own; give a directory of its own", opts.Dir)
	}
	src, err := store.Open(opts.Source)
	if err != nil {
		return Result{}, err
	}
	defer src.Close()
	sources := sourceStamps(src)
	if r, ok := reusable(opts, sources); ok {
		return r, nil
	}
	plans, err := plan(src, opts.Block)
	if err != nil {
		return Result{}, err
	}
	if err := os.MkdirAll(opts.Dir, 0o755); err != nil {
		return Result{}, err
	}
	if err := clean(opts.Dir); err != nil {
		return Result{}, err
	}
	res := Result{Dir: opts.Dir, QuantMethod: "fp8", WeightBlockSize: [2]int{opts.Block.Rows, opts.Block.Cols}, Files: len(plans)}
	var total int64
	for _, p := range plans {
		total += p.sourceBytes
	}
	res.SourceBytes = total
	prog := &progress{fn: opts.Progress, total: total}
	prog.add(0)
	weightMap := map[string]string{}
	var files []fileStamp
	for _, p := range plans {
		if err := p.write(src, opts, prog); err != nil {
			return Result{}, err
		}
		for _, t := range p.tensors {
			weightMap[t.name] = p.file
			res.Tensors++
			if t.quantScale {
				res.Quantized++
			}
		}
		res.Bytes += p.dataBytes
		st, err := os.Stat(filepath.Join(opts.Dir, p.file))
		if err != nil {
			return Result{}, err
		}
		files = append(files, fileStamp{Name: p.file, Size: st.Size()})
	}
	index, err := json.MarshalIndent(map[string]any{"metadata": map[string]any{"total_size": res.Bytes}, "weight_map": weightMap}, "", " ")
	if err != nil {
		return Result{}, err
	}
	if err := writeAtomic(opts.Dir, store.IndexFileName, index); err != nil {
		return Result{}, err
	}
	m, err := json.MarshalIndent(manifest{Format: FormatVersion, Key: opts.Key, Sources: sources, Files: files, Result: res}, "", " ")
	if err != nil {
		return Result{}, err
	}
	if err := writeAtomic(opts.Dir, ManifestName, m); err != nil {
		return Result{}, err
	}
	return res, syncDir(opts.Dir)
}

// sameDir reports whether dir is the source directory (or the directory
// of a source file or index).
func sameDir(dir, source string) bool {
	d, err := os.Stat(dir)
	if err != nil {
		return false
	}
	s, err := os.Stat(source)
	if err == nil && !s.IsDir() {
		s, err = os.Stat(filepath.Dir(source))
	}
	return err == nil && os.SameFile(d, s)
}

// sourceStamps lists the source's files by base name, size and mtime.
func sourceStamps(src *store.Checkpoint) []fileStamp {
	var out []fileStamp
	for path, id := range src.FileIDs() {
		out = append(out, fileStamp{Name: filepath.Base(path), Size: id.Size, MtimeNs: id.MtimeNs})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// reusable reports whether opts.Dir holds a complete copy made from this
// source version with this block size, and returns its result.
func reusable(opts Options, sources []fileStamp) (Result, bool) {
	b, err := os.ReadFile(filepath.Join(opts.Dir, ManifestName))
	if err != nil {
		return Result{}, false
	}
	var m manifest
	if json.Unmarshal(b, &m) != nil || m.Format != FormatVersion || m.Key != opts.Key ||
		m.Result.WeightBlockSize != [2]int{opts.Block.Rows, opts.Block.Cols} || !slices.Equal(m.Sources, sources) {
		return Result{}, false
	}
	for _, f := range append(m.Files, fileStamp{Name: store.IndexFileName}) {
		st, err := os.Stat(filepath.Join(opts.Dir, f.Name))
		if err != nil || !st.Mode().IsRegular() || (f.Size != 0 && st.Size() != f.Size) {
			return Result{}, false
		}
	}
	r := m.Result
	r.Reused, r.Dir = true, opts.Dir
	return r, true
}

// clean removes what a previous copy or an interrupted run left: the
// manifest first (the copy is no longer trusted from here on), then
// shards, the index and temporary files.
func clean(dir string) error {
	if err := os.Remove(filepath.Join(dir, ManifestName)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		n := e.Name()
		if n == store.IndexFileName || (strings.HasPrefix(n, shardPrefix) && strings.HasSuffix(n, ".safetensors")) || strings.Contains(n, tmpInfix) {
			if err := os.Remove(filepath.Join(dir, n)); err != nil && !errors.Is(err, os.ErrNotExist) {
				return err
			}
		}
	}
	return nil
}

const (
	shardPrefix = "experts-"
	tmpInfix    = ".tmp-"
)

// outTensor is one tensor of a shard.
type outTensor struct {
	name       string
	dt         dtype.DType
	shape      []int64
	off, bytes int64 // in the data section
	quantScale bool  // the scales of a quantized weight (counts the weight once)
}

// piece is how one expert's part of a role reaches the shard: copied, or
// quantized into a weight tensor and a scale tensor.
type piece struct {
	role        string
	quantize    bool
	w, s        int   // tensor indices (s only when quantizing)
	wOff, sOff  int64 // byte offsets of this expert within them
	rows, cols  int
	srows, scol int
}

// shardPlan is one MoE module's shard.
type shardPlan struct {
	file        string
	mod         *store.MoEModule
	block       quant.Block
	tensors     []outTensor
	pieces      [][]piece // per expert
	dataBytes   int64
	sourceBytes int64
}

// plan lays out one shard per MoE module.
func plan(src *store.Checkpoint, block quant.Block) ([]*shardPlan, error) {
	idx, err := src.Experts()
	if err != nil {
		return nil, err
	}
	if len(idx.Modules) == 0 {
		return nil, fmt.Errorf("%w: it has no routed expert tensors (names with %q)", ErrSource, ".experts.")
	}
	var plans []*shardPlan
	for i, m := range idx.Modules {
		p, err := planModule(m, block)
		if err != nil {
			return nil, err
		}
		p.file = fmt.Sprintf("%s%05d-of-%05d.safetensors", shardPrefix, i+1, len(idx.Modules))
		plans = append(plans, p)
	}
	return plans, nil
}

func planModule(m *store.MoEModule, block quant.Block) (*shardPlan, error) {
	p := &shardPlan{mod: m, block: block, pieces: make([][]piece, m.NumExperts)}
	add := func(t outTensor) int {
		t.bytes = int64(t.dt.Size())
		for _, d := range t.shape {
			t.bytes *= d
		}
		t.off = p.dataBytes
		p.dataBytes += t.bytes
		p.tensors = append(p.tensors, t)
		return len(p.tensors) - 1
	}
	for _, role := range m.Roles {
		p0, err := m.Part(0, role)
		if err != nil {
			return nil, err
		}
		if !p0.DType.IsFloat() {
			return nil, fmt.Errorf("%w: %s: expert tensor %q is %s; expert_dtype=\"fp8\" compresses float32, float16 or bfloat16 experts (a quantized checkpoint is served as it ships)",
				ErrSource, p0.Source, p0.Tensor, p0.DType)
		}
		p.sourceBytes += p0.NumBytes() * int64(m.NumExperts)
		matrix := len(p0.Shape) == 2 && (m.Fused || strings.HasSuffix(role, ".weight"))
		if !matrix {
			if m.Fused {
				shape := append([]int64{int64(m.NumExperts)}, p0.Shape...)
				ti := add(outTensor{name: p0.Tensor, dt: p0.DType, shape: shape})
				for e := 0; e < m.NumExperts; e++ {
					p.pieces[e] = append(p.pieces[e], piece{role: role, w: ti, wOff: int64(e) * p0.NumBytes()})
				}
			} else {
				for e := 0; e < m.NumExperts; e++ {
					pe, err := m.Part(e, role)
					if err != nil {
						return nil, err
					}
					ti := add(outTensor{name: pe.Tensor, dt: pe.DType, shape: pe.Shape})
					p.pieces[e] = append(p.pieces[e], piece{role: role, w: ti})
				}
			}
			continue
		}
		rows, cols := int(p0.Shape[0]), int(p0.Shape[1])
		sr, sc := block.ScaleGrid(rows, cols)
		pc := piece{role: role, quantize: true, rows: rows, cols: cols, srows: sr, scol: sc}
		if m.Fused {
			e := int64(m.NumExperts)
			w := add(outTensor{name: p0.Tensor, dt: dtype.F8E4M3, shape: []int64{e, int64(rows), int64(cols)}})
			s := add(outTensor{name: p0.Tensor + "_scale_inv", dt: dtype.F32, shape: []int64{e, int64(sr), int64(sc)}, quantScale: true})
			for x := 0; x < m.NumExperts; x++ {
				q := pc
				q.w, q.s, q.wOff, q.sOff = w, s, int64(x*rows*cols), int64(x*sr*sc*4)
				p.pieces[x] = append(p.pieces[x], q)
			}
			continue
		}
		for x := 0; x < m.NumExperts; x++ {
			pe, err := m.Part(x, role)
			if err != nil {
				return nil, err
			}
			q := pc
			q.w = add(outTensor{name: pe.Tensor, dt: dtype.F8E4M3, shape: []int64{int64(rows), int64(cols)}})
			q.s = add(outTensor{name: strings.TrimSuffix(pe.Tensor, ".weight") + ".weight_scale_inv", dt: dtype.F32, shape: []int64{int64(sr), int64(sc)}, quantScale: true})
			p.pieces[x] = append(p.pieces[x], q)
		}
	}
	return p, nil
}

// header returns the shard's safetensors header, padded with spaces to a
// multiple of 8 bytes, with its 8-byte length prefix.
func (p *shardPlan) header() ([]byte, error) {
	h := map[string]any{"__metadata__": map[string]string{"format": "pt", "producer": "moe_infinity expert_dtype=fp8"}}
	for _, t := range p.tensors {
		h[t.name] = map[string]any{"dtype": t.dt.String(), "shape": t.shape, "data_offsets": []int64{t.off, t.off + t.bytes}}
	}
	j, err := json.Marshal(h)
	if err != nil {
		return nil, err
	}
	if pad := (8 - len(j)%8) % 8; pad > 0 {
		j = append(j, bytes.Repeat([]byte{' '}, pad)...)
	}
	out := make([]byte, 8, 8+len(j))
	binary.LittleEndian.PutUint64(out, uint64(len(j)))
	return append(out, j...), nil
}

// write writes the shard to a temporary file, experts in parallel, syncs
// it and renames it into place.
func (p *shardPlan) write(src *store.Checkpoint, opts Options, prog *progress) (err error) {
	hdr, err := p.header()
	if err != nil {
		return err
	}
	f, err := os.CreateTemp(opts.Dir, "."+p.file+tmpInfix+"*")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(f.Name())
		}
	}()
	if err := f.Truncate(int64(len(hdr)) + p.dataBytes); err != nil {
		return err
	}
	if _, err := f.WriteAt(hdr, 0); err != nil {
		return err
	}
	if err := p.fill(f, int64(len(hdr)), opts.Workers, src.Guard, prog); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), filepath.Join(opts.Dir, p.file))
}

// fill writes every expert's pieces into w, the data section starting at
// base, with workers goroutines; each expert's reads of the source run
// under guard (the checkpoint's, for mapped files).
func (p *shardPlan) fill(w io.WriterAt, base int64, workers int, guard func(func() error) error, prog *progress) error {
	next := make(chan int)
	errs := make([]error, workers)
	var wg sync.WaitGroup
	for k := 0; k < workers; k++ {
		wg.Add(1)
		go func(k int) {
			defer wg.Done()
			for e := range next {
				if errs[k] == nil {
					errs[k] = guard(func() error { return p.writeExpert(w, base, e, prog) })
				}
			}
		}(k)
	}
	for e := 0; e < p.mod.NumExperts; e++ {
		next <- e
	}
	close(next)
	wg.Wait()
	return errors.Join(errs...)
}

// writeExpert writes expert e's pieces at their offsets.
func (p *shardPlan) writeExpert(f io.WriterAt, base int64, e int, prog *progress) error {
	var done int64
	for _, pc := range p.pieces[e] {
		part, err := p.mod.Part(e, pc.role)
		if err != nil {
			return err
		}
		w := p.tensors[pc.w]
		if !pc.quantize {
			if _, err := f.WriteAt(part.Data, base+w.off+pc.wOff); err != nil {
				return err
			}
			done += part.NumBytes()
			continue
		}
		q, s := make([]byte, pc.rows*pc.cols), make([]byte, 4*pc.srows*pc.scol)
		if err := quant.QuantFP8Block(q, s, part.Data, part.DType, pc.rows, pc.cols, p.block); err != nil {
			return fmt.Errorf("requant: %s: tensor %q (expert %d): %w", part.Source, part.Tensor, e, err)
		}
		if _, err := f.WriteAt(q, base+w.off+pc.wOff); err != nil {
			return err
		}
		if _, err := f.WriteAt(s, base+p.tensors[pc.s].off+pc.sOff); err != nil {
			return err
		}
		done += part.NumBytes()
	}
	prog.add(done)
	return nil
}

// progress serialises Options.Progress across the workers.
type progress struct {
	mu          sync.Mutex
	fn          func(done, total int64)
	done, total int64
}

func (p *progress) add(n int64) {
	if p.fn == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.done += n
	p.fn(p.done, p.total)
}

// writeAtomic writes data to dir/name through a synced temporary file and
// a rename, so that name never holds a partial file.
func writeAtomic(dir, name string, data []byte) (err error) {
	f, err := os.CreateTemp(dir, "."+name+tmpInfix+"*")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(f.Name())
		}
	}()
	if _, err := f.Write(data); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), filepath.Join(dir, name))
}

// syncDir makes the renames in dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
