package requant

import (
	"errors"
	"fmt"

	"github.com/moe-infinity/moe_infinity/go/quant"
	"github.com/moe-infinity/moe_infinity/go/store"
)

// MemoryOptions says how Module compresses.
type MemoryOptions struct {
	// Block is the FP8 weight_block_size; zero means DefaultBlock.
	Block quant.Block
	// Workers is the number of goroutines quantizing; 0 means GOMAXPROCS.
	Workers int
	// Alloc returns n bytes (n > 0) to hold the copy: store.AllocHost when
	// nil. The copy's tensors are views of it.
	Alloc func(n int64) ([]byte, error)
	// Guard runs each expert's reads of the source; nil runs them directly
	// (host tensors). A mapped checkpoint's Guard turns a truncated file
	// into an error.
	Guard func(read func() error) error
}

// ModuleCopy is one MoE module's block-FP8 copy in memory.
type ModuleCopy struct {
	// Tensors are the copy's tensors, views of Mem.
	Tensors []store.HostTensor
	// Mem is the memory from MemoryOptions.Alloc holding them.
	Mem []byte
	// Quantized is the number of weight tensors quantized (a fused tensor
	// counts once).
	Quantized int
	// Bytes is the size of the copy's tensor data in bytes.
	Bytes int64
	// SourceBytes is the size of the module's expert tensors in bytes.
	SourceBytes int64
}

// Module makes the block-FP8 copy of MoE module m's experts in memory: the
// tensors FP8 writes into m's shard, with the same names, shapes and bytes
// (quant.QuantFP8Block per weight matrix, scales beside it, anything else
// copied as it is). Errors: ErrSource for experts that are not float; an
// error of Alloc, or of reading the source, after which the memory from
// Alloc is freed when Alloc is nil (else it is the caller's).
func Module(m *store.MoEModule, opts MemoryOptions) (ModuleCopy, error) {
	if err := settle(&opts.Block, &opts.Workers); err != nil {
		return ModuleCopy{}, err
	}
	guard := opts.Guard
	if guard == nil {
		guard = func(read func() error) error { return read() }
	}
	alloc, own := opts.Alloc, opts.Alloc == nil
	if own {
		alloc = store.AllocHost
	}
	p, err := planModule(m, opts.Block)
	if err != nil {
		return ModuleCopy{}, err
	}
	if p.dataBytes == 0 {
		return ModuleCopy{}, fmt.Errorf("%w: MoE module %q has no expert bytes", ErrSource, m.Prefix)
	}
	mem, err := alloc(p.dataBytes)
	if err != nil {
		return ModuleCopy{}, err
	}
	if int64(len(mem)) < p.dataBytes {
		return ModuleCopy{}, fmt.Errorf("requant: Alloc gave %d bytes, %d asked", len(mem), p.dataBytes)
	}
	if err := p.fill(memWriter(mem), 0, opts.Workers, guard, &progress{}); err != nil {
		if own {
			err = errors.Join(err, store.FreeHost(mem))
		}
		return ModuleCopy{}, err
	}
	out := ModuleCopy{Mem: mem, Bytes: p.dataBytes, SourceBytes: p.sourceBytes}
	for _, t := range p.tensors {
		out.Tensors = append(out.Tensors, store.HostTensor{Name: t.name, DType: t.dt, Shape: t.shape, Data: mem[t.off : t.off+t.bytes : t.off+t.bytes]})
		if t.quantScale {
			out.Quantized++
		}
	}
	return out, nil
}

// memWriter writes into a byte slice (io.WriterAt).
type memWriter []byte

// WriteAt copies b to offset off; a write past the end is an error.
func (m memWriter) WriteAt(b []byte, off int64) (int, error) {
	if off < 0 || off+int64(len(b)) > int64(len(m)) {
		return 0, fmt.Errorf("requant: write of %d bytes at %d past the end of %d bytes", len(b), off, len(m))
	}
	return copy(m[off:], b), nil
}
