package engine

import (
	"fmt"

	"github.com/moe-infinity/moe_infinity/go/requant"
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
