package backend

import (
	"fmt"
	"math"

	"github.com/moe-infinity/moe_infinity/go/dtype"
)

// GptOssArgs describe gpt-oss experts (Setup.FFN "gpt_oss"; transformers'
// GptOssExperts). They are not standard SwiGLU experts: their matrices are
// stored transposed, gate and up columns interleave, both projections have
// biases and the activation is clamped:
//
//	gu       = x · GateUp[e] + GateUpBias[e]                 [2I]
//	g, u     = min(gu[2i], Limit), clamp(gu[2i+1], ±Limit)
//	h[p, i]  = (u + 1) · g · sigmoid(g · Alpha)
//	o        = h[p] · Down[e] + DownBias[e]                  [H]
//	out[t]   = Σ_j w[t·K+j] · o_{t·K+j}
//
// With bfloat16/float16 experts (MXFP4 false) the tables of FFNArgs point
// at gate_up_proj [Hidden, 2·Inter] (FFNArgs.GateUp) and down_proj [Inter,
// Hidden] (FFNArgs.Down), row-major in the activation dtype; FFNArgs.Up is
// not read. With MXFP4 experts (quant_method "mxfp4", as gpt-oss ships)
// they point at the checkpoint's blocks instead, which are the transposes:
// gate_up_proj_blocks [2·Inter, Hidden/32, 16] and down_proj_blocks
// [Hidden, Inter/32, 16] (two e2m1 values a byte, low nibble first), with
// e8m0 scale tables GateUpScale and DownScale ([2·Inter, Hidden/32] and
// [Hidden, Inter/32] bytes). Each MXFP4 weight is dequantized as
// transformers' dequantizing load does (e2m1 × 2^(scale-127), rounded to
// the activation dtype), so MXFP4 experts compute what their dequantized
// bfloat16 copies compute. Biases are in the activation dtype.
//
// Rounding follows transformers' grouped/batched expert code on
// bfloat16/float16 tensors: each projection is rounded, then its bias sum;
// the scaled gate, the sigmoid, the gated product, up + 1 and h; the
// routing-weighted output of a pair when the routing weights are
// bfloat16/float16 (not when float32); the sum over a token's pairs is
// float32, rounded once. Accumulation inside each dot product is float32
// in index order.
type GptOssArgs struct {
	// Alpha scales the gate inside the sigmoid (config.swiglu_alpha,
	// 1.702 in every release); Limit clamps gate and up
	// (config.swiglu_limit, 7.0).
	Alpha, Limit float32
	// GateUpBias[e] and DownBias[e] are the addresses of expert e's biases
	// [2·Inter] and [Hidden] (activation dtype), indexed like the row
	// tables.
	GateUpBias, DownBias []uint64
	// MXFP4 says the row tables point at MXFP4 blocks, and GateUpScale and
	// DownScale at their e8m0 scales.
	MXFP4 bool
	// GateUpScale[e] and DownScale[e] are the addresses of expert e's e8m0
	// scales (MXFP4 only; nil otherwise).
	GateUpScale, DownScale []uint64
}

// MXFP4Block is the number of values that share one e8m0 scale in MXFP4
// (quant.MXFP4BlockSize).
const MXFP4Block = 32

// validate checks the tables (n experts) and, for MXFP4, that the sizes
// are multiples of the block.
func (g *GptOssArgs) validate(a FFNArgs, n int) error {
	switch {
	case a.FP8 != nil:
		return fmt.Errorf("expert FFN: gpt-oss experts are bfloat16/float16 or MXFP4, not FP8")
	case a.Addend != 0:
		return fmt.Errorf("expert FFN: gpt-oss experts take no addend (hybrid execution computes standard SwiGLU experts only)")
	case !(g.Limit > 0) || math.IsInf(float64(g.Limit), 0) || math.IsNaN(float64(g.Alpha)) || math.IsInf(float64(g.Alpha), 0):
		return fmt.Errorf("expert FFN: gpt-oss alpha %g and limit %g must be finite, the limit positive", g.Alpha, g.Limit)
	case len(g.GateUpBias) != n || len(g.DownBias) != n:
		return fmt.Errorf("expert FFN: gpt-oss bias tables of %d and %d experts (want %d, as the row tables)", len(g.GateUpBias), len(g.DownBias), n)
	case !g.MXFP4:
		return nil
	case len(g.GateUpScale) != n || len(g.DownScale) != n:
		return fmt.Errorf("expert FFN: gpt-oss MXFP4 scale tables of %d and %d experts (want %d, as the row tables)", len(g.GateUpScale), len(g.DownScale), n)
	case a.Hidden%MXFP4Block != 0 || a.Inter%MXFP4Block != 0:
		return fmt.Errorf("expert FFN: gpt-oss MXFP4 experts need hidden %d and intermediate %d sizes that are multiples of %d", a.Hidden, a.Inter, MXFP4Block)
	}
	return nil
}

// has reports whether expert e's biases (and MXFP4 scales) are set.
func (g *GptOssArgs) has(e int64) bool {
	return g.GateUpBias[e] != 0 && g.DownBias[e] != 0 && (!g.MXFP4 || (g.GateUpScale[e] != 0 && g.DownScale[e] != 0))
}

// gptOssFFN is ReferenceFFN for gpt-oss experts (a.GptOss; see
// GptOssArgs for the formula and its rounding).
func (c *CPU) gptOssFFN(a FFNArgs) error {
	r, err := a.refInputs()
	if err != nil {
		return err
	}
	q := a.GptOss
	dt, H, I, exps, wts, x, h := r.dt, a.Hidden, a.Inter, r.exps, r.wts, r.x, r.h
	valid := func(p int64) bool {
		e := exps[p]
		return e >= 0 && int(e) < len(a.GateUp) && a.GateUp[e] != 0 && a.Down[e] != 0 && q.has(e)
	}
	alpha, limit := q.Alpha, q.Limit
	guard := c.guard()
	err = parallel(r.P*I, guard, func(lo, hi int64) {
		for idx := lo; idx < hi; idx++ {
			p, i := idx/I, idx%I
			if !valid(p) {
				h[idx] = 0
				continue
			}
			e := exps[p]
			xt := x[(p/a.K)*H : (p/a.K+1)*H]
			bias := hostSlice(q.GateUpBias[e], 2*I*2)
			var g, u float32
			if q.MXFP4 {
				g = mxfp4Dot(a.GateUp[e], q.GateUpScale[e], 2*i, xt, dt)
				u = mxfp4Dot(a.GateUp[e], q.GateUpScale[e], 2*i+1, xt, dt)
			} else {
				w := hostSlice(a.GateUp[e], H*2*I*2)
				g = colDot(w, 2*I, 2*i, xt, dt)
				u = colDot(w, 2*I, 2*i+1, xt, dt)
			}
			g = round(round(g, dt)+elem(bias, 2*i, dt), dt)
			u = round(round(u, dt)+elem(bias, 2*i+1, dt), dt)
			h[idx] = gptOssGate(g, u, alpha, limit, dt)
		}
	})
	if err != nil {
		return fmt.Errorf("backend cpu: %w", err)
	}
	roundProduct := a.WDType != dtype.F32
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
				e := exps[p]
				hp := h[p*I : (p+1)*I]
				var d float32
				if q.MXFP4 {
					d = mxfp4Dot(a.Down[e], q.DownScale[e], r, hp, dt)
				} else {
					d = colDot(hostSlice(a.Down[e], I*H*2), H, r, hp, dt)
				}
				o := round(round(d, dt)+elem(hostSlice(q.DownBias[e], H*2), r, dt), dt)
				wo := wts[p] * o
				if roundProduct {
					wo = round(wo, dt)
				}
				acc += wo
			}
			storeRounded(out, idx, acc, dt)
		}
	})
	if err != nil {
		return fmt.Errorf("backend cpu: %w", err)
	}
	return nil
}

// gptOssGate is GptOssExperts._apply_gate on one (gate, up) pair already
// rounded to dt, each step rounded to dt as torch computes it on
// bfloat16/float16 tensors (float32 arithmetic, one rounding per op; the
// Python scalars alpha and 1 enter as float32).
func gptOssGate(g, u, alpha, limit float32, dt dtype.DType) float32 {
	g = min(g, limit) // NaN stays NaN in torch's clamp; min keeps it too
	u = max(min(u, limit), -limit)
	ga := round(g*alpha, dt)
	sig := round(float32(1/(1+math.Exp(float64(-ga)))), dt)
	glu := round(g*sig, dt)
	return round(round(u+1, dt)*glu, dt)
}

// colDot is the dot product of column col of the row-major matrix w
// (len(v) rows of `cols` bfloat16/float16 elements) with v: float32
// accumulation in row order.
func colDot(w []byte, cols, col int64, v []float32, dt dtype.DType) float32 {
	var acc float32
	for r := range int64(len(v)) {
		acc += elem(w, r*cols+col, dt) * v[r]
	}
	return acc
}

// mxfp4Dot is the dot product of row `row` of the MXFP4 matrix whose
// blocks are at addr and e8m0 scales at sAddr (len(v) columns, a multiple
// of MXFP4Block) with v: each weight dequantized and rounded to dt as
// transformers dequantizes it, float32 accumulation in column order.
func mxfp4Dot(addr, sAddr uint64, row int64, v []float32, dt dtype.DType) float32 {
	n := int64(len(v))
	groups := n / MXFP4Block
	blocks := hostSlice(addr+uint64(row*n/2), n/2)
	scales := hostSlice(sAddr+uint64(row*groups), groups)
	var acc float32
	for g := range groups {
		s := dtype.E8M0ToF32(scales[g])
		for k := range int64(MXFP4Block / 2) {
			b := blocks[g*MXFP4Block/2+k]
			c := g*MXFP4Block + 2*k
			acc += round(dtype.E2M1ToF32(b&0xf)*s, dt) * v[c]
			acc += round(dtype.E2M1ToF32(b>>4)*s, dt) * v[c+1]
		}
	}
	return acc
}
