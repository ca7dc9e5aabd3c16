package engine

import (
	"fmt"
	"time"

	"github.com/moe-infinity/moe_infinity/go/backend"
	"github.com/moe-infinity/moe_infinity/go/dtype"
	"github.com/moe-infinity/moe_infinity/go/layout"
)

// FFNCall is one MoE layer's expert FFN computed by the backend's kernels
// (see backend.FFNArgs for the formula). Experts lists the distinct experts
// that TopK routes to.
type FFNCall struct {
	Layer   int
	Experts []int32
	Stream  uintptr
	// X, Out, Scratch, TopK ([T, K] int64) and Weights ([T, K] float32)
	// are addresses (host for the CPU backend, device for the CUDA backend).
	X, Out, Scratch, TopK, Weights uint64
	// T tokens, K experts per token.
	T, K int64
	// DType is the activations' type (dtype.BF16 or dtype.F16 for the
	// kernels; dtype.Invalid for any other).
	DType dtype.DType
	// WDType is the routing weights' type (dtype.F32, BF16 or F16 for the
	// kernels; dtype.Invalid for any other).
	WDType dtype.DType
}

// FFNShape returns the hidden and intermediate sizes the expert FFN works
// with, from the layout's gate_up_proj [2I, H] and down_proj [H, I]
// regions, and the experts' (and activations') type: dtype.BF16 or
// dtype.F16.
func (e *Engine) FFNShape() (hidden, inter int64, dt dtype.DType, err error) {
	if err := e.readyLocked(); err != nil {
		return 0, 0, 0, err
	}
	return e.ffnShape()
}

// ffnShape is FFNShape for a configured (or configuring) engine. For
// quantized experts the sizes and the activation type are those of the
// dequantized views (the kernels dequantize to it), and the experts must
// be FP8 ones the kernels can read in place (layout.Views.FP8Kernel), or
// for gpt-oss experts (setup ffn "gpt_oss") MXFP4 ones
// (layout.Views.GptOssKernel); gpt-oss's sizes are those of gate_up_proj
// [H, 2I] and down_proj [I, H] (layout.GptOssKernel).
func (e *Engine) ffnShape() (hidden, inter int64, dt dtype.DType, err error) {
	if e.ffn == "gpt_oss" {
		k, err := e.gptOssKernel()
		if err != nil {
			return 0, 0, 0, err
		}
		return k.Hidden, k.Inter, k.DType, nil
	}
	lay := e.lay
	if e.vw != nil {
		if _, err := e.vw.FP8Kernel("gate_up_proj", "down_proj"); err != nil {
			return 0, 0, 0, fmt.Errorf("%w: the experts are quantized (%s): %v", ErrUnsupported, e.vw.Method, err)
		}
		lay = e.vw.Layout
	}
	gu, ok1 := lay.Region("gate_up_proj")
	dn, ok2 := lay.Region("down_proj")
	if !ok1 || !ok2 || len(gu.Shape) != 2 || len(dn.Shape) != 2 {
		return 0, 0, 0, fmt.Errorf("%w: the expert FFN kernels need 2D gate_up_proj and down_proj regions", ErrUnsupported)
	}
	hidden, inter = gu.Shape[1], gu.Shape[0]/2
	if gu.Shape[0] != 2*inter || dn.Shape[0] != hidden || dn.Shape[1] != inter || gu.DType != dn.DType {
		return 0, 0, 0, fmt.Errorf("%w: gate_up_proj %v and down_proj %v are not [2I, H] and [H, I] of one dtype", ErrUnsupported, gu.Shape, dn.Shape)
	}
	if dt, err := dtype.Parse(gu.DType); err == nil && backend.IsActivationDType(dt) {
		return hidden, inter, dt, nil
	}
	return 0, 0, 0, fmt.Errorf("%w: the expert FFN kernels take bfloat16 or float16 experts, not %s", ErrUnsupported, gu.DType)
}

// gptOssKernel locates gpt-oss experts in the slot image
// (layout.GptOssKernel; for MXFP4 experts the views say what they are).
func (e *Engine) gptOssKernel() (layout.GptOssKernel, error) {
	var k layout.GptOssKernel
	var err error
	if e.vw != nil {
		k, err = e.vw.GptOssKernel()
	} else {
		k, err = e.lay.GptOssKernel()
	}
	if err != nil {
		return k, fmt.Errorf("%w: %v", ErrUnsupported, err)
	}
	return k, nil
}

// setKernelLayout sets where the kernels find an expert's matrices in its
// slot image (e.kl), when they can read them (ffnShape): the halves of
// gate_up_proj [2I, H] and down_proj [H, I], or for FP8 experts the
// matrices and their scale grids (layout.Views.FP8Kernel), with their
// block and up rows (e.fp8). Slot calls and mapped mode's tables both
// rest on it. gpt-oss experts (setup ffn "gpt_oss") are located by e.gk
// (and e.kl's gpt-oss entries, for mapped mode), with their activation's
// constants in e.gptoss.
func (e *Engine) setKernelLayout(s Setup) {
	hidden, inter, _, err := e.ffnShape()
	if err != nil {
		return
	}
	if e.ffn == "gpt_oss" {
		k, _ := e.gptOssKernel() // ffnShape checked it
		alpha, limit := GptOssAlpha, GptOssLimit
		if s.SwigluAlpha != nil {
			alpha = *s.SwigluAlpha
		}
		if s.SwigluLimit != nil {
			limit = *s.SwigluLimit
		}
		e.gk, e.gptoss = &k, &backend.GptOssArgs{Alpha: float32(alpha), Limit: float32(limit), MXFP4: k.MXFP4}
		// Mapped mode's entries: the matrices (MXFP4 blocks), biases and
		// scales, as sized in the slot image.
		gu, dn := hidden*2*inter*2, inter*hidden*2
		if k.MXFP4 {
			gu, dn = 2*inter*hidden/2, hidden*inter/2
		}
		e.kl = backend.MappedLayout{GptOss: true, Gate: k.GateUp, Down: k.Down, RowsBytes: gu, DownBytes: dn,
			Biases: [2]int64{k.GateUpBias, k.DownBias}, BiasBytes: [2]int64{2 * inter * 2, hidden * 2}}
		if k.MXFP4 {
			e.kl.Scales = [3]int64{k.GateUpScale, 0, k.DownScale}
			e.kl.ScaleBytes = [3]int64{2 * inter * hidden / 32, 0, hidden * inter / 32}
		}
		return
	}
	if e.vw != nil {
		k, _ := e.vw.FP8Kernel("gate_up_proj", "down_proj") // ffnShape checked it
		e.kl = backend.MappedLayout{
			Gate: k.Gate.Weight, Up: k.Up.Weight, Down: k.Down.Weight, RowsBytes: inter * hidden, DownBytes: hidden * inter,
			Scales:     [3]int64{k.Gate.Scale, k.Up.Scale, k.Down.Scale},
			ScaleBytes: [3]int64{k.Gate.ScaleBytes, k.Up.ScaleBytes, k.Down.ScaleBytes},
		}
		e.fp8 = &backend.FP8Args{BlockRows: int64(k.Block.Rows), BlockCols: int64(k.Block.Cols), UpRow0: k.Up.Row0}
		return
	}
	gu, _ := e.lay.Region("gate_up_proj")
	dn, _ := e.lay.Region("down_proj")
	rows := inter * hidden * 2
	e.kl = backend.MappedLayout{Gate: gu.Offset, Up: gu.Offset + rows, Down: dn.Offset, RowsBytes: rows, DownBytes: rows}
}

// LayerFFN acquires the layer's experts, runs the backend's expert FFN over
// all of them in one launch and releases them — one call per MoE layer.
func (e *Engine) LayerFFN(c FFNCall) error {
	hidden, inter, dt, err := e.FFNShape()
	if err != nil {
		return err
	}
	kern := e.ft.Kernels
	if kern == nil {
		return fmt.Errorf("%w: backend %s has no expert FFN kernels", ErrUnsupported, e.be.Name())
	}
	if err := checkActivations(c, dt); err != nil {
		return err
	}
	if len(c.Experts) == 0 {
		return fmt.Errorf("%w: no experts to compute", ErrInvalid)
	}
	slots := make([]int32, len(c.Experts))
	t0 := time.Now()
	// The kernels read the slots, also when they hold quantized experts.
	lease, err := e.acquire(c.Layer, c.Experts, slots, c.Stream, false)
	if err != nil {
		return err
	}
	t0 = e.phase(phaseAcquire, t0)
	ffnErr := kern.FFN(e.kernelArgs(c, hidden, inter, dt, c.Experts, slots))
	t0 = e.phase(phaseKernels, t0)
	if err := e.Release(lease, c.Stream); err != nil && ffnErr == nil {
		ffnErr = err
	}
	e.phase(phaseRelease, t0)
	if ffnErr != nil {
		return fmt.Errorf("expert FFN of layer %d: %w", c.Layer, ffnErr)
	}
	return nil
}

// kernelArgs are the kernels' arguments for call c over experts, which
// are in slots (slots[i] holds experts[i]). The tables' other entries are
// null: the kernels skip pairs routed there (hybrid execution's CPU
// experts).
func (e *Engine) kernelArgs(c FFNCall, hidden, inter int64, dt dtype.DType, experts, slots []int32) backend.FFNArgs {
	args := backend.FFNArgs{
		Stream: c.Stream, X: c.X, Out: c.Out, Scratch: c.Scratch, TopK: c.TopK, Weights: c.Weights,
		T: c.T, K: c.K, Hidden: hidden, Inter: inter, DType: dt, WDType: c.WDType,
		GateUp: make([]uint64, e.experts), Up: make([]uint64, e.experts), Down: make([]uint64, e.experts),
	}
	if e.gk != nil {
		return e.gptOssArgs(args, experts, slots)
	}
	var q *backend.FP8Args
	if e.fp8 != nil {
		qq := *e.fp8
		qq.GateScale, qq.UpScale, qq.DownScale = make([]uint64, e.experts), make([]uint64, e.experts), make([]uint64, e.experts)
		q, args.FP8 = &qq, &qq
	}
	for i, s := range slots {
		r := e.kl.SlotRows(e.be.SlotAddr(int(s)))
		x := experts[i]
		args.GateUp[x], args.Up[x], args.Down[x] = uint64(r[backend.EntryGate]), uint64(r[backend.EntryUp]), uint64(r[backend.EntryDown])
		if q != nil {
			q.GateScale[x], q.UpScale[x], q.DownScale[x] = uint64(r[backend.EntryGateScale]), uint64(r[backend.EntryUpScale]), uint64(r[backend.EntryDownScale])
		}
	}
	return args
}

// gptOssArgs completes args (kernelArgs') for gpt-oss experts: the row
// tables point at each slot's matrices (or MXFP4 blocks), args.GptOss's at
// its biases and scales; other entries are null.
func (e *Engine) gptOssArgs(args backend.FFNArgs, experts, slots []int32) backend.FFNArgs {
	k := e.gk
	q := *e.gptoss
	n := e.experts
	args.Up = nil
	q.GateUpBias, q.DownBias = make([]uint64, n), make([]uint64, n)
	if q.MXFP4 {
		q.GateUpScale, q.DownScale = make([]uint64, n), make([]uint64, n)
	}
	for i, s := range slots {
		base := uint64(e.be.SlotAddr(int(s)))
		x := experts[i]
		args.GateUp[x], args.Down[x] = base+uint64(k.GateUp), base+uint64(k.Down)
		q.GateUpBias[x], q.DownBias[x] = base+uint64(k.GateUpBias), base+uint64(k.DownBias)
		if q.MXFP4 {
			q.GateUpScale[x], q.DownScale[x] = base+uint64(k.GateUpScale), base+uint64(k.DownScale)
		}
	}
	args.GptOss = &q
	return args
}

// layerKernels traces counts (the per-request routing of c.Experts, from
// routingCounts, topk being the [T, K] routing on the host) and computes
// the layer with LayerFFN, or with layerHybrid when ChooseMisses sends
// some of its misses to the CPU, which it may only where cpu is true (not
// in a row-wise call: see hostHybridOK).
//
// The order is the core's Layer (the order go/sim replays): trace and
// refresh priorities first (the eviction choices of this layer's loads
// use them), then issue the layer's copies and kernels, and plan
// prefetches for the later layers last: planning (EAMC matching) used to
// sit between the routing's arrival and the demand copies, with the link
// idle.
func (e *Engine) layerKernels(c FFNCall, reqs []uint64, topk []int64, counts [][]float32, cpu bool) error {
	t0 := time.Now()
	if len(reqs) > 0 {
		if err := e.checkObserve(c.Layer, reqs, counts); err != nil {
			return err
		}
	}
	var planned time.Time
	_, err := e.core.Layer(c.Layer, reqs, counts, func() error {
		e.phase(phaseObserve, t0)
		var pick cpuPick
		if cpu {
			pick = e.chooseCPU(c, reqs, topk)
		}
		var ffnErr error
		if len(pick.experts) > 0 {
			ffnErr = e.layerHybrid(c, pick, topk)
		} else {
			ffnErr = e.LayerFFN(c)
		}
		planned = time.Now()
		return ffnErr
	})
	if len(reqs) > 0 && !planned.IsZero() {
		e.phase(phaseObserve, planned)
	}
	return routingErr(err)
}

// checkActivations fails when call c's activations are not of the
// experts' type dt, the one the kernels compute in.
func checkActivations(c FFNCall, dt dtype.DType) error {
	if c.DType != dt {
		act := c.DType.TorchName()
		if c.DType == dtype.Invalid {
			act = "of another type (not bfloat16 or float16)"
		}
		return fmt.Errorf("%w: activations are %s but the experts are %s", ErrInvalid, act, dt.TorchName())
	}
	return nil
}
