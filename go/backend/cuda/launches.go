package cuda

// This file has no build tag (and no cgo), so that the CPU build's tests
// check what the FFN launches pass (ptx_test.go, kparams_test.go).

import (
	"math"

	"github.com/moe-infinity/moe_infinity/go/backend"
)

// warpsPerBlock is the warps of every FFN kernel's block (MOE_WARPS in
// cuda/moe_ffn.cu).
const warpsPerBlock = 8

// ffnLaunches are the two launches of an FFN call, gate_up then down
// (cuda/moe_ffn.cu): the kernels' names in the PTX, their grids (x, y;
// blocks of 32·warpsPerBlock threads) and their parameter structs.
type ffnLaunches[G, D kernelParams] struct {
	kernels [2]string
	grids   [2][2]int
	gateUp  G
	down    D
}

// ffnGrids are an FFN call's two grids when a block computes rows output
// rows (one a warp, or one a lane): gate_up's over Inter rows × the T·K
// pairs, down's over Hidden rows × the T tokens.
func ffnGrids(a backend.FFNArgs, rows int64) [2][2]int {
	return [2][2]int{{int((a.Inter + rows - 1) / rows), int(a.T * a.K)}, {int((a.Hidden + rows - 1) / rows), int(a.T)}}
}

// swigluLaunches are the launches of a SwiGLU FFN call (moe_gate_up_swiglu
// and moe_down, or their _fp8 variants for a.FP8) over the tables at tab:
// entry j (backend.EntryGate, ...) of expert e at tab + 8·(j·n + e), n
// experts (3 entries each, 6 for FP8 experts). Null entries skip their
// pairs; a.Addend (0: none) joins moe_down's sums. skip is a copy-mode
// hand-off's device skip list (0: none; bfloat16/float16 experts only):
// pairs of the experts it lists are skipped, and a.Addend is added only
// when it says so. A warp computes one output row.
func swigluLaunches(a backend.FFNArgs, tab uint64, n int, skip uint64) (ffnLaunches[gateUpParams, downParams], error) {
	code, wcode, err := kernelDTypes(a)
	if err != nil {
		return ffnLaunches[gateUpParams, downParams]{}, err
	}
	P := a.T * a.K
	at := func(j int) uint64 { return tab + uint64(8*j*n) }
	l := ffnLaunches[gateUpParams, downParams]{
		kernels: [2]string{"moe_gate_up_swiglu", "moe_down"},
		grids:   ffnGrids(a, warpsPerBlock),
		gateUp: gateUpParams{X: a.X, TopK: a.TopK, GateTab: at(backend.EntryGate), UpTab: at(backend.EntryUp), Scratch: a.Scratch,
			P: P, K: a.K, Hidden: a.Hidden, Inter: a.Inter, DType: code, E: int64(n), Skip: skip},
		down: downParams{Scratch: a.Scratch, TopK: a.TopK, DownTab: at(backend.EntryDown), Weights: a.Weights, Out: a.Out,
			T: a.T, K: a.K, Hidden: a.Hidden, Inter: a.Inter, DType: code, E: int64(n), WDType: wcode, Addend: a.Addend, Skip: skip},
	}
	if q := a.FP8; q != nil {
		l.kernels = [2]string{"moe_gate_up_swiglu_fp8", "moe_down_fp8"}
		l.gateUp.Skip, l.down.Skip = 0, 0 // the FP8 kernels take no skip list
		l.gateUp.BlockRows, l.gateUp.BlockCols, l.gateUp.UpRow0 = q.BlockRows, q.BlockCols, q.UpRow0
		l.gateUp.GateScaleTab, l.gateUp.UpScaleTab = at(backend.EntryGateScale), at(backend.EntryUpScale)
		l.down.BlockRows, l.down.BlockCols, l.down.DownScaleTab = q.BlockRows, q.BlockCols, at(backend.EntryDownScale)
	}
	return l, nil
}

// gptOssLaunches are the launches of a gpt-oss FFN call (a.GptOss) over
// the tables at tab (gptOssTable's layout, n experts). The
// bfloat16/float16 kernels give each lane one output column (32 a block);
// the MXFP4 ones each warp one output row, as the SwiGLU kernels do. alpha
// and limit pass as float32 bits.
func gptOssLaunches(a backend.FFNArgs, tab uint64, n int) (ffnLaunches[gptOssGateUpParams, gptOssDownParams], error) {
	code, wcode, err := kernelDTypes(a)
	if err != nil {
		return ffnLaunches[gptOssGateUpParams, gptOssDownParams]{}, err
	}
	q := a.GptOss
	P := a.T * a.K
	at := func(j int) uint64 { return tab + uint64(8*j*n) }
	l := ffnLaunches[gptOssGateUpParams, gptOssDownParams]{
		kernels: [2]string{"moe_gate_up_gptoss", "moe_down_gptoss"},
		grids:   ffnGrids(a, 32),
		gateUp: gptOssGateUpParams{X: a.X, TopK: a.TopK, GateUpTab: at(ossGateUp), BiasTab: at(ossGateUpBias), Scratch: a.Scratch,
			P: P, K: a.K, Hidden: a.Hidden, Inter: a.Inter, DType: code, E: int64(n),
			AlphaBits: int64(math.Float32bits(q.Alpha)), LimitBits: int64(math.Float32bits(q.Limit))},
		down: gptOssDownParams{Scratch: a.Scratch, TopK: a.TopK, DownTab: at(ossDown), BiasTab: at(ossDownBias), Weights: a.Weights, Out: a.Out,
			T: a.T, K: a.K, Hidden: a.Hidden, Inter: a.Inter, DType: code, E: int64(n), WDType: wcode},
	}
	if q.MXFP4 {
		l.kernels = [2]string{"moe_gate_up_gptoss_mxfp4", "moe_down_gptoss_mxfp4"}
		l.grids = ffnGrids(a, warpsPerBlock)
		l.gateUp.ScaleTab, l.down.ScaleTab = at(ossGateUpScale), at(ossDownScale)
	}
	return l, nil
}
