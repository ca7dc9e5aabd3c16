package engine

import (
	"errors"
	"fmt"
	"strings"

	"github.com/moe-infinity/moe_infinity/go/requant"
	"github.com/moe-infinity/moe_infinity/go/store"
	"github.com/moe-infinity/moe_infinity/go/strictjson"
)

// CompressRequest asks AddCompressed for the block-FP8 copy of a
// checkpoint's routed experts (package requant).
type CompressRequest struct {
	// Source is the checkpoint (a directory, index or file).
	Source string `json:"source"`
	// Dir is the directory of the copy (the caller's offload directory
	// holds it).
	Dir string `json:"dir"`
	// Key identifies the source's version; a copy made under another key
	// is rewritten.
	Key string `json:"key"`
}

// ParseCompressRequest decodes a CompressRequest from JSON (unknown keys
// are errors); source and dir are required. Errors wrap ErrInvalid.
func ParseCompressRequest(b []byte) (CompressRequest, error) {
	var r CompressRequest
	if err := strictjson.Decode(b, &r); err != nil {
		return r, fmt.Errorf("%w: compress request: %v", ErrInvalid, err)
	}
	if r.Source == "" || r.Dir == "" {
		return r, fmt.Errorf("%w: compress request needs \"source\" and \"dir\"", ErrInvalid)
	}
	return r, nil
}

// AddCompressed makes the block-FP8 copy of the routed experts of
// req.Source in req.Dir, or reuses the one already there (requant.FP8), and
// adds the copy as a checkpoint: the engine then serves those experts as
// it serves an FP8 checkpoint's (configure with quant_method "fp8" and the
// result's weight_block_size). Progress reports the source bytes done
// while it runs. A source whose experts are not float gives an error
// wrapping requant.ErrSource.
func (e *Engine) AddCompressed(req CompressRequest) (requant.Result, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if err := e.checkOpen(); err != nil {
		return requant.Result{}, err
	}
	if res, ok := e.compressed[req]; ok { // a retry (say after MOE_ERR_BUFFER): already added
		return res, nil
	}
	if e.configured {
		return requant.Result{}, fmt.Errorf("%w: add checkpoints before configure", ErrState)
	}
	res, err := requant.FP8(requant.Options{Source: req.Source, Dir: req.Dir, Key: req.Key, Progress: func(done, total int64) {
		e.compressTotal.Store(total)
		e.compressDone.Store(done)
	}})
	if err != nil {
		return requant.Result{}, err
	}
	if err := e.ckpt.AddPath(res.Dir); err != nil {
		return requant.Result{}, err
	}
	if e.compressed == nil {
		e.compressed = map[CompressRequest]requant.Result{}
	}
	e.compressed[req] = res
	return res, nil
}

// HostCompressRequest asks CompressHost for the block-FP8 copy of one MoE
// module whose experts were added with AddHostTensor.
type HostCompressRequest struct {
	// Prefix names the MoE module: everything before ".experts." in its
	// tensor names, e.g. "model.layers.0.mlp".
	Prefix string `json:"prefix"`
}

// ParseHostCompressRequest decodes a HostCompressRequest from JSON
// (unknown keys are errors); prefix is required. Errors wrap ErrInvalid.
func ParseHostCompressRequest(b []byte) (HostCompressRequest, error) {
	var r HostCompressRequest
	if err := strictjson.Decode(b, &r); err != nil {
		return r, fmt.Errorf("%w: compress_host request: %v", ErrInvalid, err)
	}
	if r.Prefix == "" {
		return r, fmt.Errorf("%w: compress_host request needs \"prefix\"", ErrInvalid)
	}
	return r, nil
}

// HostCompressResult is what CompressHost did.
type HostCompressResult struct {
	// Prefix is the module compressed.
	Prefix string `json:"prefix"`
	// QuantMethod is "fp8", the quant_method to configure with.
	QuantMethod string `json:"quant_method"`
	// WeightBlockSize is the block [rows, cols] of the scales.
	WeightBlockSize [2]int `json:"weight_block_size"`
	// Released is the number of host tensors the engine no longer reads:
	// the caller may free their memory.
	Released int `json:"released"`
	// Tensors is the number of tensors of the copy (weights, scales and
	// copied biases).
	Tensors int `json:"tensors"`
	// Bytes is the copy's size in bytes (engine-owned host memory).
	Bytes int64 `json:"bytes"`
	// SourceBytes is the size of the module's experts as added, in bytes.
	SourceBytes int64 `json:"source_bytes"`
}

// CompressHost replaces the float experts of MoE module req.Prefix, added
// with AddHostTensor, by their block-FP8 copy in host memory the engine
// owns (requant.Module: the bytes expert_dtype="fp8" writes for a
// checkpoint, 128 × 128 blocks), released at Close. The tensors added for
// the module are no longer read when it returns: the caller may free
// them, so that compressing layer by layer keeps one layer's float
// experts in memory beside the copies. The engine then serves the module
// as an FP8 checkpoint's (configure with quant_method "fp8" and the
// result's weight_block_size). A second call for the module returns the
// first's result (a retry after MOE_ERR_BUFFER). Errors: ErrInvalid for an unknown module or
// one with tensors that were not added with AddHostTensor; an error
// wrapping requant.ErrSource for experts that are not float; ErrState
// after Configure.
func (e *Engine) CompressHost(req HostCompressRequest) (HostCompressResult, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if err := e.checkOpen(); err != nil {
		return HostCompressResult{}, err
	}
	if res, ok := e.hostCompressed[req.Prefix]; ok { // a retry (say after MOE_ERR_BUFFER): already done
		return res, nil
	}
	if e.configured {
		return HostCompressResult{}, fmt.Errorf("%w: compress host experts before configure", ErrState)
	}
	idx, err := e.ckpt.Experts()
	if err != nil {
		return HostCompressResult{}, err
	}
	m, ok := idx.Module(req.Prefix)
	if !ok {
		var have []string
		for _, x := range idx.Modules {
			have = append(have, x.Prefix)
		}
		return HostCompressResult{}, fmt.Errorf("%w: compress_host: no MoE module %q among the tensors added (modules: %s)",
			ErrInvalid, req.Prefix, strings.Join(have, ", "))
	}
	names, err := moduleTensors(m)
	if err != nil {
		return HostCompressResult{}, err
	}
	cp, err := requant.Module(m, requant.MemoryOptions{Block: requant.DefaultBlock})
	if err != nil {
		return HostCompressResult{}, err
	}
	if err := e.ckpt.ReplaceHost(names, cp.Tensors, cp.Mem); err != nil {
		return HostCompressResult{}, errors.Join(err, store.FreeHost(cp.Mem))
	}
	res := HostCompressResult{
		Prefix: req.Prefix, QuantMethod: "fp8", WeightBlockSize: [2]int{requant.DefaultBlock.Rows, requant.DefaultBlock.Cols},
		Released: len(names), Tensors: len(cp.Tensors), Bytes: cp.Bytes, SourceBytes: cp.SourceBytes,
	}
	if e.hostCompressed == nil {
		e.hostCompressed = map[string]HostCompressResult{}
	}
	e.hostCompressed[req.Prefix] = res
	return res, nil
}

// moduleTensors lists the names of module m's tensors, every one of which
// must be a host tensor (AddHostTensor).
func moduleTensors(m *store.MoEModule) ([]string, error) {
	seen := map[string]bool{}
	var names []string
	for e := 0; e < m.NumExperts; e++ {
		for _, role := range m.Roles {
			p, err := m.Part(e, role)
			if err != nil {
				return nil, err
			}
			if p.Source != store.HostSource {
				return nil, fmt.Errorf("%w: compress_host: MoE module %q: tensor %q comes from %s; compress_host compresses tensors added with add_host_tensor (a checkpoint's experts are compressed with add_compressed)",
					ErrInvalid, m.Prefix, p.Tensor, p.Source)
			}
			if !seen[p.Tensor] {
				seen[p.Tensor] = true
				names = append(names, p.Tensor)
			}
		}
	}
	return names, nil
}
