// moe_params.h — the FFN kernels' parameter structs. GENERATED from
// go/backend/cuda/kparams.go by "go generate ./go/backend/cuda"; do not edit.
//
// Each FFN kernel takes one of these by value; the Go launch fills the Go
// struct of the same layout. The static_asserts state Go's offsets and
// sizes, so a layout clang does not share fails the PTX build.
#pragma once

static_assert(sizeof(unsigned long long) == 8 && sizeof(long long) == 8, "8-byte fields");

// moe_gate_up_params: Go gateUpParams; taken by moe_gate_up_swiglu, moe_gate_up_swiglu_fp8.
typedef struct moe_gate_up_params {
    unsigned long long x;
    unsigned long long top_k;
    unsigned long long gate_tab;
    unsigned long long up_tab;
    unsigned long long scratch;
    long long p;
    long long k;
    long long hidden;
    long long inter;
    long long dtype;
    long long e;
    unsigned long long skip;
    long long block_rows;
    long long block_cols;
    unsigned long long gate_scale_tab;
    unsigned long long up_scale_tab;
    long long up_row0;
} moe_gate_up_params;
static_assert(sizeof(moe_gate_up_params) == 136, "moe_gate_up_params: Go's size");
static_assert(alignof(moe_gate_up_params) == 8, "moe_gate_up_params: Go's alignment");
static_assert(__builtin_offsetof(moe_gate_up_params, x) == 0, "moe_gate_up_params.x: Go's offset");
static_assert(__builtin_offsetof(moe_gate_up_params, top_k) == 8, "moe_gate_up_params.top_k: Go's offset");
static_assert(__builtin_offsetof(moe_gate_up_params, gate_tab) == 16, "moe_gate_up_params.gate_tab: Go's offset");
static_assert(__builtin_offsetof(moe_gate_up_params, up_tab) == 24, "moe_gate_up_params.up_tab: Go's offset");
static_assert(__builtin_offsetof(moe_gate_up_params, scratch) == 32, "moe_gate_up_params.scratch: Go's offset");
static_assert(__builtin_offsetof(moe_gate_up_params, p) == 40, "moe_gate_up_params.p: Go's offset");
static_assert(__builtin_offsetof(moe_gate_up_params, k) == 48, "moe_gate_up_params.k: Go's offset");
static_assert(__builtin_offsetof(moe_gate_up_params, hidden) == 56, "moe_gate_up_params.hidden: Go's offset");
static_assert(__builtin_offsetof(moe_gate_up_params, inter) == 64, "moe_gate_up_params.inter: Go's offset");
static_assert(__builtin_offsetof(moe_gate_up_params, dtype) == 72, "moe_gate_up_params.dtype: Go's offset");
static_assert(__builtin_offsetof(moe_gate_up_params, e) == 80, "moe_gate_up_params.e: Go's offset");
static_assert(__builtin_offsetof(moe_gate_up_params, skip) == 88, "moe_gate_up_params.skip: Go's offset");
static_assert(__builtin_offsetof(moe_gate_up_params, block_rows) == 96, "moe_gate_up_params.block_rows: Go's offset");
static_assert(__builtin_offsetof(moe_gate_up_params, block_cols) == 104, "moe_gate_up_params.block_cols: Go's offset");
static_assert(__builtin_offsetof(moe_gate_up_params, gate_scale_tab) == 112, "moe_gate_up_params.gate_scale_tab: Go's offset");
static_assert(__builtin_offsetof(moe_gate_up_params, up_scale_tab) == 120, "moe_gate_up_params.up_scale_tab: Go's offset");
static_assert(__builtin_offsetof(moe_gate_up_params, up_row0) == 128, "moe_gate_up_params.up_row0: Go's offset");

// moe_down_params: Go downParams; taken by moe_down, moe_down_fp8.
typedef struct moe_down_params {
    unsigned long long scratch;
    unsigned long long top_k;
    unsigned long long down_tab;
    unsigned long long weights;
    unsigned long long out;
    long long t;
    long long k;
    long long hidden;
    long long inter;
    long long dtype;
    long long e;
    long long wdtype;
    unsigned long long addend;
    unsigned long long skip;
    long long block_rows;
    long long block_cols;
    unsigned long long down_scale_tab;
} moe_down_params;
static_assert(sizeof(moe_down_params) == 136, "moe_down_params: Go's size");
static_assert(alignof(moe_down_params) == 8, "moe_down_params: Go's alignment");
static_assert(__builtin_offsetof(moe_down_params, scratch) == 0, "moe_down_params.scratch: Go's offset");
static_assert(__builtin_offsetof(moe_down_params, top_k) == 8, "moe_down_params.top_k: Go's offset");
static_assert(__builtin_offsetof(moe_down_params, down_tab) == 16, "moe_down_params.down_tab: Go's offset");
static_assert(__builtin_offsetof(moe_down_params, weights) == 24, "moe_down_params.weights: Go's offset");
static_assert(__builtin_offsetof(moe_down_params, out) == 32, "moe_down_params.out: Go's offset");
static_assert(__builtin_offsetof(moe_down_params, t) == 40, "moe_down_params.t: Go's offset");
static_assert(__builtin_offsetof(moe_down_params, k) == 48, "moe_down_params.k: Go's offset");
static_assert(__builtin_offsetof(moe_down_params, hidden) == 56, "moe_down_params.hidden: Go's offset");
static_assert(__builtin_offsetof(moe_down_params, inter) == 64, "moe_down_params.inter: Go's offset");
static_assert(__builtin_offsetof(moe_down_params, dtype) == 72, "moe_down_params.dtype: Go's offset");
static_assert(__builtin_offsetof(moe_down_params, e) == 80, "moe_down_params.e: Go's offset");
static_assert(__builtin_offsetof(moe_down_params, wdtype) == 88, "moe_down_params.wdtype: Go's offset");
static_assert(__builtin_offsetof(moe_down_params, addend) == 96, "moe_down_params.addend: Go's offset");
static_assert(__builtin_offsetof(moe_down_params, skip) == 104, "moe_down_params.skip: Go's offset");
static_assert(__builtin_offsetof(moe_down_params, block_rows) == 112, "moe_down_params.block_rows: Go's offset");
static_assert(__builtin_offsetof(moe_down_params, block_cols) == 120, "moe_down_params.block_cols: Go's offset");
static_assert(__builtin_offsetof(moe_down_params, down_scale_tab) == 128, "moe_down_params.down_scale_tab: Go's offset");

// moe_gptoss_gate_up_params: Go gptOssGateUpParams; taken by moe_gate_up_gptoss, moe_gate_up_gptoss_mxfp4.
typedef struct moe_gptoss_gate_up_params {
    unsigned long long x;
    unsigned long long top_k;
    unsigned long long gate_up_tab;
    unsigned long long bias_tab;
    unsigned long long scratch;
    long long p;
    long long k;
    long long hidden;
    long long inter;
    long long dtype;
    long long e;
    long long alpha_bits;
    long long limit_bits;
    unsigned long long scale_tab;
} moe_gptoss_gate_up_params;
static_assert(sizeof(moe_gptoss_gate_up_params) == 112, "moe_gptoss_gate_up_params: Go's size");
static_assert(alignof(moe_gptoss_gate_up_params) == 8, "moe_gptoss_gate_up_params: Go's alignment");
static_assert(__builtin_offsetof(moe_gptoss_gate_up_params, x) == 0, "moe_gptoss_gate_up_params.x: Go's offset");
static_assert(__builtin_offsetof(moe_gptoss_gate_up_params, top_k) == 8, "moe_gptoss_gate_up_params.top_k: Go's offset");
static_assert(__builtin_offsetof(moe_gptoss_gate_up_params, gate_up_tab) == 16, "moe_gptoss_gate_up_params.gate_up_tab: Go's offset");
static_assert(__builtin_offsetof(moe_gptoss_gate_up_params, bias_tab) == 24, "moe_gptoss_gate_up_params.bias_tab: Go's offset");
static_assert(__builtin_offsetof(moe_gptoss_gate_up_params, scratch) == 32, "moe_gptoss_gate_up_params.scratch: Go's offset");
static_assert(__builtin_offsetof(moe_gptoss_gate_up_params, p) == 40, "moe_gptoss_gate_up_params.p: Go's offset");
static_assert(__builtin_offsetof(moe_gptoss_gate_up_params, k) == 48, "moe_gptoss_gate_up_params.k: Go's offset");
static_assert(__builtin_offsetof(moe_gptoss_gate_up_params, hidden) == 56, "moe_gptoss_gate_up_params.hidden: Go's offset");
static_assert(__builtin_offsetof(moe_gptoss_gate_up_params, inter) == 64, "moe_gptoss_gate_up_params.inter: Go's offset");
static_assert(__builtin_offsetof(moe_gptoss_gate_up_params, dtype) == 72, "moe_gptoss_gate_up_params.dtype: Go's offset");
static_assert(__builtin_offsetof(moe_gptoss_gate_up_params, e) == 80, "moe_gptoss_gate_up_params.e: Go's offset");
static_assert(__builtin_offsetof(moe_gptoss_gate_up_params, alpha_bits) == 88, "moe_gptoss_gate_up_params.alpha_bits: Go's offset");
static_assert(__builtin_offsetof(moe_gptoss_gate_up_params, limit_bits) == 96, "moe_gptoss_gate_up_params.limit_bits: Go's offset");
static_assert(__builtin_offsetof(moe_gptoss_gate_up_params, scale_tab) == 104, "moe_gptoss_gate_up_params.scale_tab: Go's offset");

// moe_gptoss_down_params: Go gptOssDownParams; taken by moe_down_gptoss, moe_down_gptoss_mxfp4.
typedef struct moe_gptoss_down_params {
    unsigned long long scratch;
    unsigned long long top_k;
    unsigned long long down_tab;
    unsigned long long bias_tab;
    unsigned long long weights;
    unsigned long long out;
    long long t;
    long long k;
    long long hidden;
    long long inter;
    long long dtype;
    long long e;
    long long wdtype;
    unsigned long long scale_tab;
} moe_gptoss_down_params;
static_assert(sizeof(moe_gptoss_down_params) == 112, "moe_gptoss_down_params: Go's size");
static_assert(alignof(moe_gptoss_down_params) == 8, "moe_gptoss_down_params: Go's alignment");
static_assert(__builtin_offsetof(moe_gptoss_down_params, scratch) == 0, "moe_gptoss_down_params.scratch: Go's offset");
static_assert(__builtin_offsetof(moe_gptoss_down_params, top_k) == 8, "moe_gptoss_down_params.top_k: Go's offset");
static_assert(__builtin_offsetof(moe_gptoss_down_params, down_tab) == 16, "moe_gptoss_down_params.down_tab: Go's offset");
static_assert(__builtin_offsetof(moe_gptoss_down_params, bias_tab) == 24, "moe_gptoss_down_params.bias_tab: Go's offset");
static_assert(__builtin_offsetof(moe_gptoss_down_params, weights) == 32, "moe_gptoss_down_params.weights: Go's offset");
static_assert(__builtin_offsetof(moe_gptoss_down_params, out) == 40, "moe_gptoss_down_params.out: Go's offset");
static_assert(__builtin_offsetof(moe_gptoss_down_params, t) == 48, "moe_gptoss_down_params.t: Go's offset");
static_assert(__builtin_offsetof(moe_gptoss_down_params, k) == 56, "moe_gptoss_down_params.k: Go's offset");
static_assert(__builtin_offsetof(moe_gptoss_down_params, hidden) == 64, "moe_gptoss_down_params.hidden: Go's offset");
static_assert(__builtin_offsetof(moe_gptoss_down_params, inter) == 72, "moe_gptoss_down_params.inter: Go's offset");
static_assert(__builtin_offsetof(moe_gptoss_down_params, dtype) == 80, "moe_gptoss_down_params.dtype: Go's offset");
static_assert(__builtin_offsetof(moe_gptoss_down_params, e) == 88, "moe_gptoss_down_params.e: Go's offset");
static_assert(__builtin_offsetof(moe_gptoss_down_params, wdtype) == 96, "moe_gptoss_down_params.wdtype: Go's offset");
static_assert(__builtin_offsetof(moe_gptoss_down_params, scale_tab) == 104, "moe_gptoss_down_params.scale_tab: Go's offset");
