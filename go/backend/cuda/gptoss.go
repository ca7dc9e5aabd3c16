package cuda

// This file has no build tag, so that the CPU build's tests check the
// gpt-oss kernels' arguments against the embedded PTX (ptx_test.go).

import (
	"math"

	"github.com/moe-infinity/moe_infinity/go/backend"
)

// warpsPerBlock is the warps of every FFN kernel's block (MOE_WARPS in
// cuda/moe_ffn.cu).
const warpsPerBlock = 8

// A gpt-oss expert's table entries (FFNArgs.GptOss), in table order, the
// same as mapped mode's (backend.EntryOss...): its matrices (or MXFP4
// blocks), biases and MXFP4 scales. ossEntries of them, as many as an FP8
// expert's (tableBytes).
const (
	ossGateUp      = backend.EntryOssGateUp
	ossGateUpBias  = backend.EntryOssGateUpBias
	ossDown        = backend.EntryOssDown
	ossDownBias    = backend.EntryOssDownBias
	ossGateUpScale = backend.EntryOssGateUpScale
	ossDownScale   = backend.EntryOssDownScale
	ossEntries     = ossDownScale + 1
)

// gptOssTable writes a's gpt-oss tables into tab (ossEntries × n
// pointers, entry j of expert e at tab[j·n+e]; scale entries 0 unless
// MXFP4).
func gptOssTable(tab []uint64, a backend.FFNArgs, n int) {
	q := a.GptOss
	clear(tab)
	copy(tab[ossGateUp*n:], a.GateUp)
	copy(tab[ossGateUpBias*n:], q.GateUpBias)
	copy(tab[ossDown*n:], a.Down)
	copy(tab[ossDownBias*n:], q.DownBias)
	if q.MXFP4 {
		copy(tab[ossGateUpScale*n:], q.GateUpScale)
		copy(tab[ossDownScale*n:], q.DownScale)
	}
}

// kernelLaunch is one kernel launch: the kernel's name in the PTX, its
// grid (x, y; blocks of 32·warpsPerBlock threads) and its parameters.
type kernelLaunch struct {
	kernel string
	grid   [2]int
	args   []uint64
}

// gptOssLaunches are the two launches of a gpt-oss FFN call (a.GptOss)
// over the tables at tab (gptOssTable's layout, n experts): gate_up, then
// down (cuda/moe_ffn.cu). The bfloat16/float16 kernels give each lane one
// output column (32 a block); the MXFP4 ones each warp one output row, as
// the SwiGLU kernels do. alpha and limit pass as float32 bits.
func gptOssLaunches(a backend.FFNArgs, tab uint64, n int) ([]kernelLaunch, error) {
	code, wcode, err := kernelDTypes(a)
	if err != nil {
		return nil, err
	}
	q := a.GptOss
	P := a.T * a.K
	at := func(j int) uint64 { return tab + uint64(8*j*n) }
	alpha, limit := uint64(math.Float32bits(q.Alpha)), uint64(math.Float32bits(q.Limit))
	shape := []uint64{uint64(a.Hidden), uint64(a.Inter), uint64(code), uint64(n)}
	gateUp := append(append([]uint64{a.X, a.TopK, at(ossGateUp), at(ossGateUpBias), a.Scratch, uint64(P), uint64(a.K)}, shape...), alpha, limit)
	down := append(append([]uint64{a.Scratch, a.TopK, at(ossDown), at(ossDownBias), a.Weights, a.Out, uint64(a.T), uint64(a.K)}, shape...), uint64(wcode))
	if q.MXFP4 {
		return []kernelLaunch{
			{"moe_gate_up_gptoss_mxfp4", [2]int{int((a.Inter + warpsPerBlock - 1) / warpsPerBlock), int(P)}, append(gateUp, at(ossGateUpScale))},
			{"moe_down_gptoss_mxfp4", [2]int{int((a.Hidden + warpsPerBlock - 1) / warpsPerBlock), int(a.T)}, append(down, at(ossDownScale))},
		}, nil
	}
	return []kernelLaunch{
		{"moe_gate_up_gptoss", [2]int{int((a.Inter + 31) / 32), int(P)}, gateUp},
		{"moe_down_gptoss", [2]int{int((a.Hidden + 31) / 32), int(a.T)}, down},
	}, nil
}
