package cuda

// This file has no build tag (and no cgo), so that the CPU build's tests
// check the generated header and the PTX against it.

import (
	"fmt"
	"reflect"
	"strings"
)

// The FFN kernels' parameters. Each FFN kernel of cuda/moe_ffn.cu takes one
// struct by value (PTX: one .param .align 8 .b8 name[size]), which the Go
// launch fills and passes as the single entry of cuLaunchKernel's argument
// array. The layout is stated here, once: cuda/moe_params.h, which the
// kernels include, is generated from these types (kernelParamsHeader) with
//
//	go generate ./go/backend/cuda
//
// and states every field's offset and each struct's size and alignment as
// static_asserts, so that compiling the PTX (make ptx) fails if clang lays
// a struct out otherwise than Go does. Every field is 8 bytes (uint64 for a
// device address, int64 for an integer), so there is no padding on either
// side. TestKernelParamsHeaderIsGenerated checks the committed header
// against these types, TestKernelParamsMatchThePTX the kernels' PTX.
//
//go:generate go test -run ^TestKernelParamsHeaderIsGenerated$ -update .

// gateUpParams are the parameters of moe_gate_up_swiglu and
// moe_gate_up_swiglu_fp8 (C: moe_gate_up_params): h[p, i] for every pair
// p of the P = T·K pairs and row i of Inter.
type gateUpParams struct {
	// X is [T, Hidden] activations (DType); TopK [T, K] int64 expert ids.
	X, TopK uint64
	// GateTab and UpTab are the tables of the experts' gate and up rows
	// (indexed by expert id; a null entry skips its pairs).
	GateTab, UpTab uint64
	// Scratch receives h, [P, Inter] float32.
	Scratch uint64
	// P pairs, K experts per token; Hidden and Inter are the FFN sizes.
	P, K, Hidden, Inter int64
	// DType is the kernels' activation code (kernelDTypes); E the tables'
	// length in experts.
	DType, E int64
	// Skip is a copy-mode hand-off's skip list (0: none; moe_gate_up_swiglu
	// only).
	Skip uint64
	// BlockRows and BlockCols are the FP8 scale blocks (weight_block_size),
	// GateScaleTab and UpScaleTab the tables of the scale grids, UpRow0 the
	// up rows' first row in the up grid (moe_gate_up_swiglu_fp8 only).
	BlockRows, BlockCols     int64
	GateScaleTab, UpScaleTab uint64
	UpRow0                   int64
}

// downParams are the parameters of moe_down and moe_down_fp8 (C:
// moe_down_params): out[t, r] for every token t of T and row r of Hidden.
type downParams struct {
	// Scratch is h, [P, Inter] float32; TopK [T, K] int64 expert ids.
	Scratch, TopK uint64
	// DownTab is the table of the experts' down rows.
	DownTab uint64
	// Weights is [T, K] routing weights (WDType); Out receives [T, Hidden]
	// (DType).
	Weights, Out uint64
	// T tokens, K experts per token; Hidden and Inter are the FFN sizes.
	T, K, Hidden, Inter int64
	// DType and WDType are the kernels' activation and routing-weight
	// codes (kernelDTypes); E the table's length in experts.
	DType, E, WDType int64
	// Addend is [T, Hidden] float32 added to each sum before its rounding
	// (0: none); Skip a copy-mode hand-off's skip list (0: none; moe_down
	// only).
	Addend, Skip uint64
	// BlockRows and BlockCols are the FP8 scale blocks, DownScaleTab the
	// table of the scale grids (moe_down_fp8 only).
	BlockRows, BlockCols int64
	DownScaleTab         uint64
}

// gptOssGateUpParams are the parameters of moe_gate_up_gptoss and
// moe_gate_up_gptoss_mxfp4 (C: moe_gptoss_gate_up_params).
type gptOssGateUpParams struct {
	// X is [T, Hidden] activations (DType); TopK [T, K] int64 expert ids.
	X, TopK uint64
	// GateUpTab and BiasTab are the tables of the experts' gate_up
	// matrices (or MXFP4 blocks) and gate_up biases.
	GateUpTab, BiasTab uint64
	// Scratch receives h, [P, Inter] float32.
	Scratch uint64
	// P pairs, K experts per token; Hidden and Inter are the FFN sizes.
	P, K, Hidden, Inter int64
	// DType is the kernels' activation code; E the tables' length.
	DType, E int64
	// AlphaBits and LimitBits are the float32 bits of the activation's
	// alpha and limit.
	AlphaBits, LimitBits int64
	// ScaleTab is the table of the MXFP4 scales (the _mxfp4 kernel only).
	ScaleTab uint64
}

// gptOssDownParams are the parameters of moe_down_gptoss and
// moe_down_gptoss_mxfp4 (C: moe_gptoss_down_params).
type gptOssDownParams struct {
	// Scratch is h, [P, Inter] float32; TopK [T, K] int64 expert ids.
	Scratch, TopK uint64
	// DownTab and BiasTab are the tables of the experts' down matrices
	// (or MXFP4 blocks) and down biases.
	DownTab, BiasTab uint64
	// Weights is [T, K] routing weights (WDType); Out receives [T, Hidden].
	Weights, Out uint64
	// T tokens, K experts per token; Hidden and Inter are the FFN sizes.
	T, K, Hidden, Inter int64
	// DType and WDType are the kernels' codes; E the tables' length.
	DType, E, WDType int64
	// ScaleTab is the table of the MXFP4 scales (the _mxfp4 kernel only).
	ScaleTab uint64
}

// kernelParams are the FFN kernels' parameter structs.
type kernelParams interface {
	gateUpParams | downParams | gptOssGateUpParams | gptOssDownParams
}

// paramStruct is one parameter struct: its C name, a zero value of its Go
// type, and the kernels that take it.
type paramStruct struct {
	c       string
	goType  reflect.Type
	kernels []string
}

// kernelParamStructs lists the parameter structs and which kernel takes
// which, in the header's order.
var kernelParamStructs = []paramStruct{
	{"moe_gate_up_params", reflect.TypeFor[gateUpParams](), []string{"moe_gate_up_swiglu", "moe_gate_up_swiglu_fp8"}},
	{"moe_down_params", reflect.TypeFor[downParams](), []string{"moe_down", "moe_down_fp8"}},
	{"moe_gptoss_gate_up_params", reflect.TypeFor[gptOssGateUpParams](), []string{"moe_gate_up_gptoss", "moe_gate_up_gptoss_mxfp4"}},
	{"moe_gptoss_down_params", reflect.TypeFor[gptOssDownParams](), []string{"moe_down_gptoss", "moe_down_gptoss_mxfp4"}},
}

// cFieldName is the C name of Go field f: lower case, with an underscore
// where a lower-case letter or digit meets an upper-case one ("GateTab" →
// "gate_tab", "DType" → "dtype", "UpRow0" → "up_row0").
func cFieldName(f string) string {
	var b strings.Builder
	prevLower := false
	for _, r := range f {
		upper := r >= 'A' && r <= 'Z'
		if upper && prevLower {
			b.WriteByte('_')
		}
		if upper {
			r += 'a' - 'A'
		}
		b.WriteRune(r)
		prevLower = !upper
	}
	return b.String()
}

// kernelParamsHeader generates cuda/moe_params.h from kernelParamStructs:
// each struct with its fields in Go's order, and static_asserts of every
// field's offset (Go's unsafe.Offsetof) and of the struct's size and
// alignment. It fails for a field that is not a uint64 or an int64.
func kernelParamsHeader() (string, error) {
	var b strings.Builder
	b.WriteString(`// moe_params.h — the FFN kernels' parameter structs. GENERATED from
// go/backend/cuda/kparams.go by "go generate ./go/backend/cuda"; do not edit.
//
// Each FFN kernel takes one of these by value; the Go launch fills the Go
// struct of the same layout. The static_asserts state Go's offsets and
// sizes, so a layout clang does not share fails the PTX build.
#pragma once

static_assert(sizeof(unsigned long long) == 8 && sizeof(long long) == 8, "8-byte fields");
`)
	for _, s := range kernelParamStructs {
		t := s.goType
		fmt.Fprintf(&b, "\n// %s: Go %s; taken by %s.\ntypedef struct %s {\n", s.c, t.Name(), strings.Join(s.kernels, ", "), s.c)
		var asserts []string
		for i := range t.NumField() {
			f := t.Field(i)
			var ct string
			switch f.Type.Kind() {
			case reflect.Uint64:
				ct = "unsigned long long"
			case reflect.Int64:
				ct = "long long"
			default:
				return "", fmt.Errorf("kernel params %s.%s is %s: fields are uint64 (addresses) or int64", t.Name(), f.Name, f.Type)
			}
			if f.Offset != uintptr(8*i) {
				return "", fmt.Errorf("kernel params %s.%s at offset %d, not %d", t.Name(), f.Name, f.Offset, 8*i)
			}
			name := cFieldName(f.Name)
			fmt.Fprintf(&b, "    %s %s;\n", ct, name)
			asserts = append(asserts, fmt.Sprintf("static_assert(__builtin_offsetof(%s, %s) == %d, \"%s.%s: Go's offset\");", s.c, name, f.Offset, s.c, name))
		}
		fmt.Fprintf(&b, "} %s;\n", s.c)
		fmt.Fprintf(&b, "static_assert(sizeof(%s) == %d, \"%s: Go's size\");\n", s.c, t.Size(), s.c)
		fmt.Fprintf(&b, "static_assert(alignof(%s) == %d, \"%s: Go's alignment\");\n", s.c, t.Align(), s.c)
		b.WriteString(strings.Join(asserts, "\n") + "\n")
	}
	return b.String(), nil
}
