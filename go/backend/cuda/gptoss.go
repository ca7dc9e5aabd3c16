package cuda

// This file has no build tag, so that the CPU build's tests check the
// gpt-oss tables (ptx_test.go).

import (
	"github.com/moe-infinity/moe_infinity/go/backend"
)

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
