package backend

import (
	"encoding/binary"
	"fmt"
	"math"
	"runtime"
	"sync"
	"unsafe"

	"github.com/moe-infinity/moe_infinity/go/dtype"
)

// FFNArgs are the arguments of one expert-FFN computation over every
// (token, expert) pair of a MoE layer (T tokens, K experts per token,
// P = T·K pairs p = t·K + j):
//
//	h[p]   = silu(Wgate[e_p] · x[t]) ⊙ (Wup[e_p] · x[t])          (float32)
//	out[t] = Σ_j w[t·K+j] · Wdown[e_{t·K+j}] · h[t·K+j]         (x's dtype)
//
// with e_p = TopK[p], the router's choice. Addresses are host addresses for
// the CPU backend and device addresses for a GPU backend. Rounding follows
// transformers' low-precision expert code: each projection, the activation
// and the gated product are rounded to the activation dtype; the weighted
// sum over a token's experts is float32, rounded once.
type FFNArgs struct {
	// Stream is the raw stream the computation is ordered on (GPU only).
	Stream uintptr
	// X is [T, Hidden] activations (DType); Out receives [T, Hidden].
	X, Out uint64
	// Scratch is [P, Inter] float32 for the SwiGLU intermediate.
	Scratch uint64
	// TopK is [T, K] int64 expert ids; Weights is [T, K] routing weights
	// of WDType.
	TopK, Weights       uint64
	T, K, Hidden, Inter int64
	// DType is the activations' (and experts') type: dtype.BF16 or
	// dtype.F16.
	DType dtype.DType
	// WDType is the routing weights' type: dtype.F32, dtype.BF16 or
	// dtype.F16 (the zero value, dtype.Invalid, is rejected).
	WDType dtype.DType
	// GateUp[e] and Down[e] are the addresses of expert e's gate_up
	// [2·Inter, Hidden] and down [Hidden, Inter] regions, indexed by expert
	// id. A null entry (GateUp[e] == 0) means "skip": every pair routed to
	// e contributes nothing (h = 0), as for experts the layer does not use;
	// hybrid execution leaves the CPU's experts null so that the kernels
	// compute only the device's.
	GateUp, Down []uint64
	// Up[e], when set, is the address of expert e's up rows [Inter,
	// Hidden]; otherwise they follow the gate rows at GateUp[e].
	Up []uint64
	// FP8, when set, says the experts' weights are FP8 block-scaled (see
	// FP8Args): the tables point at their float8_e4m3fn rows, and FP8's
	// tables at their scale grids.
	FP8 *FP8Args
	// GptOss, when set, says the experts are gpt-oss's, not standard SwiGLU
	// (see GptOssArgs for their formula, layout and rounding): GateUp and
	// Down point at their transposed matrices (or MXFP4 blocks), Up is not
	// read, and GptOss's tables point at their biases (and MXFP4 scales).
	GptOss *GptOssArgs
	// SkipInvalid makes a (token, expert) pair whose id is outside the
	// tables (or whose expert has gate rows but lacks others) contribute
	// nothing instead of failing the call, as the GPU kernels do (mapped
	// mode reports such ids once the routing reaches the host).
	SkipInvalid bool
	// Addend, when not 0, is the address of [T, Hidden] float32 added to
	// each token's weighted sum after its pairs and before the one rounding
	// to the activation dtype:
	//
	//	out[t] = round(Σ_j w[t·K+j] · Wdown[e] · h[t·K+j] + Addend[t])
	//
	// Hybrid execution passes the CPU's partial output there (the sum over
	// the pairs whose experts it computed), so the layer's result is the
	// device's part plus the CPU's.
	Addend uint64
}

// IsActivationDType reports whether dt is a type the expert FFN takes for
// activations and experts: bfloat16 or float16.
func IsActivationDType(dt dtype.DType) bool { return dt == dtype.BF16 || dt == dtype.F16 }

// IsRoutingWeightsDType reports whether dt is a type the expert FFN takes
// for routing weights: float32, bfloat16 or float16.
func IsRoutingWeightsDType(dt dtype.DType) bool { return dt == dtype.F32 || IsActivationDType(dt) }

// UpAddr is the address of expert e's up rows.
func (a FFNArgs) UpAddr(e int64) uint64 {
	if a.GptOss != nil { // gate and up columns interleave in gate_up
		return a.GateUp[e]
	}
	if a.Up != nil {
		return a.Up[e]
	}
	if a.GateUp[e] == 0 {
		return 0
	}
	return a.GateUp[e] + uint64(a.Inter*a.Hidden*a.WeightSize())
}

// WeightSize is the size in bytes of one weight element: 1 for FP8
// experts, 2 for bfloat16/float16 ones.
func (a FFNArgs) WeightSize() int64 {
	if a.FP8 != nil {
		return 1
	}
	return 2
}

// checkPair fails for pair p routed to expert e when the call cannot
// compute it: e outside the tables, or e with gate rows but without its
// up or down rows (or FP8 scale grids). A null entry (GateUp[e] == 0) is
// not an error: the pair is skipped. SkipInvalid skips every such pair.
func (a FFNArgs) checkPair(p, e int64) error {
	if a.SkipInvalid {
		return nil
	}
	if e < 0 || int(e) >= len(a.GateUp) {
		return fmt.Errorf("pair %d routes to expert %d, outside the tables of %d experts", p, e, len(a.GateUp))
	}
	if a.GateUp[e] != 0 && (a.UpAddr(e) == 0 || a.Down[e] == 0 || (a.FP8 != nil && !a.FP8.has(e)) || (a.GptOss != nil && !a.GptOss.has(e))) {
		return fmt.Errorf("pair %d routes to expert %d, whose table entries are incomplete", p, e)
	}
	return nil
}

// Kernels is implemented by backends that compute the expert FFN
// themselves.
type Kernels interface {
	FFN(a FFNArgs) error
}

// Validate checks the shapes and tables.
func (a FFNArgs) Validate() error {
	n := len(a.GateUp)
	switch {
	case n == 0 || len(a.Down) != n || (a.Up != nil && len(a.Up) != n):
		return fmt.Errorf("expert FFN needs matching, non-empty expert tables (got %d, %d and %d)", n, len(a.Up), len(a.Down))
	case a.T <= 0 || a.K <= 0 || a.Hidden <= 0 || a.Inter <= 0:
		return fmt.Errorf("expert FFN shape T=%d K=%d hidden=%d inter=%d must be positive", a.T, a.K, a.Hidden, a.Inter)
	case !IsActivationDType(a.DType):
		return fmt.Errorf("expert FFN activation dtype %s: the kernels take BF16 or F16", a.DType)
	case !IsRoutingWeightsDType(a.WDType):
		return fmt.Errorf("expert FFN routing-weight dtype %s: the kernels take F32, BF16 or F16", a.WDType)
	case a.X == 0 || a.Out == 0 || a.Scratch == 0 || a.TopK == 0 || a.Weights == 0:
		return fmt.Errorf("expert FFN: a tensor address is null")
	case a.GptOss != nil:
		return a.GptOss.validate(a, n)
	case a.FP8 != nil:
		return a.FP8.validate(a.Inter, n)
	}
	return nil
}

// HostPtr turns a host address (received through the C ABI, or of a
// hand-off's pinned buffers) into a pointer; the caller guarantees the
// memory is valid for as long as it is used (torch tensors: the call).
func HostPtr(addr uint64) unsafe.Pointer { return *(*unsafe.Pointer)(unsafe.Pointer(&addr)) }

// hostSlice views host memory at addr as n bytes.
func hostSlice(addr uint64, n int64) []byte { return unsafe.Slice((*byte)(HostPtr(addr)), n) }

// FFN computes the expert FFN on the CPU. With ExpertThreads set and
// every expert the call reads in the slots, the SIMD kernels of package
// cpuffn compute it (see there for how their sums differ from the
// reference's); otherwise, and always for rows outside the slots (mapped
// mode's checkpoint pages, which can fault and are read only under the
// source's guard), ReferenceFFN does.
func (c *CPU) FFN(a FFNArgs) error {
	if k := c.expertKernel(); k != nil {
		done, err := k.ffn(c, a)
		if err != nil {
			return fmt.Errorf("backend cpu: %w", err)
		}
		if done {
			return nil
		}
	}
	return c.ReferenceFFN(a)
}

// ReferenceFFN computes the expert FFN in plain Go: the reference for
// every backend's kernels, the SIMD ones included (same formula, float32
// accumulation in index order, and the same rounding to the activation
// dtype after each projection and the gate as transformers'
// bfloat16/float16 expert code). FP8 experts (a.FP8) are read compressed,
// each weight dequantized on the fly as transformers dequantizes it, so the
// result is bit for bit that of bfloat16/float16 experts dequantized first.
// gpt-oss experts (a.GptOss) follow their own formula (GptOssArgs), from
// bfloat16/float16 or MXFP4 weights. Expert rows are read under the
// source's guard.
func (c *CPU) ReferenceFFN(a FFNArgs) error {
	if err := a.Validate(); err != nil {
		return fmt.Errorf("backend cpu: %w", err)
	}
	if a.GptOss != nil {
		return c.gptOssFFN(a)
	}
	r, err := a.refInputs()
	if err != nil {
		return err
	}
	dt, H, I, exps, wts, x, h := r.dt, a.Hidden, a.Inter, r.exps, r.wts, r.x, r.h
	valid := func(p int64) bool {
		e := exps[p]
		return e >= 0 && int(e) < len(a.GateUp) && a.GateUp[e] != 0 && a.UpAddr(e) != 0 && a.Down[e] != 0 && (a.FP8 == nil || a.FP8.has(e))
	}
	var addend []float32
	if a.Addend != 0 {
		addend = unsafe.Slice((*float32)(HostPtr(a.Addend)), a.T*H)
	}
	// Every goroutine that reads expert rows runs under the source's guard:
	// in mapped mode they are the checkpoint's file mapping.
	guard := c.guard()
	err = parallel(r.P*I, guard, func(lo, hi int64) {
		for idx := lo; idx < hi; idx++ {
			p, i := idx/I, idx%I
			if !valid(p) {
				h[idx] = 0
				continue
			}
			t := p / a.K
			xt := x[t*H : (t+1)*H]
			var g, u float32
			if q := a.FP8; q != nil {
				e := exps[p]
				g = round(fp8Dot(q, a.GateUp[e], q.GateScale[e], 0, i, xt, dt), dt)
				u = round(fp8Dot(q, a.UpAddr(e), q.UpScale[e], q.UpRow0, i, xt, dt), dt)
			} else {
				wg := hostSlice(a.GateUp[exps[p]], I*H*2)
				wu := hostSlice(a.UpAddr(exps[p]), I*H*2)
				g = round(dotRow(wg[i*H*2:(i+1)*H*2], xt, dt), dt)
				u = round(dotRow(wu[i*H*2:(i+1)*H*2], xt, dt), dt)
			}
			act := round(g/(1+float32(math.Exp(float64(-g)))), dt)
			h[idx] = round(act*u, dt)
		}
	})
	if err != nil {
		return fmt.Errorf("backend cpu: %w", err)
	}
	out := hostSlice(a.Out, a.T*H*2)
	err = parallel(a.T*H, guard, func(lo, hi int64) {
		for idx := lo; idx < hi; idx++ {
			t, r := idx/H, idx%H
			var acc float32
			for j := int64(0); j < a.K; j++ {
				p := t*a.K + j
				if !valid(p) {
					continue
				}
				hp := h[p*I : (p+1)*I]
				if q := a.FP8; q != nil {
					acc += wts[p] * round(fp8Dot(q, a.Down[exps[p]], q.DownScale[exps[p]], 0, r, hp, dt), dt)
					continue
				}
				w := hostSlice(a.Down[exps[p]], H*I*2)
				acc += wts[p] * round(dotRow(w[r*I*2:(r+1)*I*2], hp, dt), dt)
			}
			if addend != nil {
				acc += addend[idx]
			}
			storeRounded(out, idx, acc, dt)
		}
	})
	if err != nil {
		return fmt.Errorf("backend cpu: %w", err)
	}
	return nil
}

// guard returns the source's Guard, or a plain call before Open.
func (c *CPU) guard() func(read func() error) error {
	c.mu.Lock()
	src := c.src
	c.mu.Unlock()
	if src == nil {
		return func(read func() error) error { return read() }
	}
	return src.Guard
}

// routingWeights reads a's P routing weights (of a validated WDType) as
// float32.
func routingWeights(a FFNArgs, P int64) []float32 {
	switch a.WDType {
	case dtype.BF16, dtype.F16:
		return toF32(hostSlice(a.Weights, P*2), a.WDType)
	}
	return unsafe.Slice((*float32)(HostPtr(a.Weights)), P)
}

// round rounds v to dt (bfloat16 or float16) and back, to nearest even.
func round(v float32, dt dtype.DType) float32 {
	bits := math.Float32bits(v)
	if dt == dtype.BF16 {
		return math.Float32frombits(uint32(dtype.F32BitsToBF16(bits)) << 16)
	}
	return math.Float32frombits(dtype.F16ToF32Bits(dtype.F32BitsToF16(bits)))
}

func toF32(b []byte, dt dtype.DType) []float32 {
	out := make([]float32, len(b)/2)
	_ = dtype.Convert(unsafe.Slice((*byte)(unsafe.Pointer(&out[0])), 4*len(out)), dtype.F32, b, dt)
	return out
}

// elem is element i of a little-endian bfloat16/float16 vector.
func elem(b []byte, i int64, dt dtype.DType) float32 {
	bits := uint32(binary.LittleEndian.Uint16(b[2*i:]))
	if dt == dtype.BF16 {
		return math.Float32frombits(bits << 16)
	}
	return math.Float32frombits(dtype.F16ToF32Bits(uint16(bits)))
}

func dotRow(row []byte, v []float32, dt dtype.DType) float32 {
	var acc float32
	for c := range v {
		acc += elem(row, int64(c), dt) * v[c]
	}
	return acc
}

// refInputs is what the reference FFNs read of a: the activation dtype,
// the P = T·K routed experts and their weights, x as float32 and the
// float32 scratch h [P, Inter]; every pair checked (checkPair).
type refInputs struct {
	dt   dtype.DType
	P    int64
	exps []int64
	wts  []float32
	x, h []float32
}

func (a FFNArgs) refInputs() (refInputs, error) {
	r := refInputs{dt: a.DType, P: a.T * a.K}
	r.exps = unsafe.Slice((*int64)(HostPtr(a.TopK)), r.P)
	for p := int64(0); p < r.P; p++ {
		if err := a.checkPair(p, r.exps[p]); err != nil {
			return refInputs{}, fmt.Errorf("backend cpu: %w", err)
		}
	}
	r.wts = routingWeights(a, r.P)
	r.x = toF32(hostSlice(a.X, a.T*a.Hidden*2), r.dt)
	r.h = unsafe.Slice((*float32)(HostPtr(a.Scratch)), r.P*a.Inter)
	return r, nil
}

// storeRounded writes v, rounded to dt, as element idx of the
// bfloat16/float16 vector out.
func storeRounded(out []byte, idx int64, v float32, dt dtype.DType) {
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], math.Float32bits(v))
	_ = dtype.Convert(out[idx*2:idx*2+2], dt, b[:], dtype.F32)
}

// parallel runs f over [0, n) split across GOMAXPROCS goroutines, each
// under guard, and returns the first error a guard returned.
func parallel(n int64, guard func(read func() error) error, f func(lo, hi int64)) error {
	run := func(lo, hi int64) error { return guard(func() error { f(lo, hi); return nil }) }
	workers := int64(runtime.GOMAXPROCS(0))
	if n < 1024 || workers < 2 {
		return run(0, n)
	}
	step := (n + workers - 1) / workers
	var wg sync.WaitGroup
	errs := make([]error, (n+step-1)/step)
	for i, lo := 0, int64(0); lo < n; i, lo = i+1, lo+step {
		wg.Add(1)
		go func(i int, lo, hi int64) {
			defer wg.Done()
			errs[i] = run(lo, hi)
		}(i, lo, min(lo+step, n))
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}
