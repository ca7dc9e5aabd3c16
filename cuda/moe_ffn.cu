// moe_ffn.cu — the engine's fused expert FFN for decode.
//
// Data path of one MoE layer (T tokens, k experts per token, P = T·k
// (token, expert) pairs p = t·k + j, every needed expert resident in a
// cache slot):
//
//   moe_gate_up_swiglu: h[p, i] = silu(Wg[e_p] x[t_p])[i] · (Wu[e_p] x[t_p])[i]     (f32)
//   moe_down:           out[t, :] = Σ_j w[t·k+j] · Wd[e_{t·k+j}] h[t·k+j, :] (+ addend[t, :])  (x's dtype)
//
// e_p comes straight from the router's top_k_index (int64 [T, k]) and
// indexes tables of expert pointers by expert id (entries of experts the
// layer does not use are never read), so no remapping runs before the
// launch. A table entry is either the expert's cache slot (HBM) or, in
// mapped mode, the expert's pinned host memory, which the kernel then reads
// over PCIe (zero copy): measured on an H100 at 94-96% of the DMA bandwidth,
// so a miss costs the same as copying the expert first, without the copy,
// its event or any host synchronisation. Ids outside [0, E) contribute
// nothing (the host sees them in the routing and reports the error), and
// so do pairs whose expert's table entry is null: hybrid execution leaves
// the experts the CPU computes null, and passes the CPU's partial output
// (float32 [T, H], the sum over its pairs) as moe_down's addend, added to
// each token's sum after its pairs and before the one rounding. The
// engine's CPU reference (go/backend, ReferenceFFN) does the same. In a
// copy-mode replay with the CPU hand-off, skip (device memory, written by
// moe_publish_wait; null otherwise) lists the CPU's experts instead:
// pairs with skip[e] set are skipped, and the addend is added only when
// skip[E] is set (the wait ended with the engine's answer).
//
// Rounding follows transformers' bfloat16/float16 expert code: the gate and
// up projections, the activation, the gated product and the down projection
// are each rounded to the activation dtype; the routing-weighted sum over a
// token's experts is float32 and rounded once. (Accumulation inside each dot
// product is float32.)
//
// Each kernel covers every expert of the layer in one launch; experts are
// reached through a table of slot pointers, so nothing is gathered or
// copied. Weights are row-major as transformers keeps them: gate_up
// [2I, H] (gate rows first, then up rows), down [H, I]. A warp computes one
// output row: lanes stride along the row with 16-byte loads (8 elements),
// then reduce with shuffles; accumulation is f32. Token-order summation
// over j keeps the result deterministic (no atomics).
//
// Each FFN kernel takes one parameter struct by value (moe_params.h,
// generated from the Go launch's structs in go/backend/cuda/kparams.go,
// with static_asserts of Go's layout); it first unpacks the fields into
// locals of the types the arithmetic uses. dtype: 0 = bfloat16,
// 1 = float16 (the Go side's one translation: kernelDTypes).
// Gate and up rows come from separate tables (gtab, utab) so that a host
// checkpoint keeping gate_proj and up_proj apart is read in place.

#include "compat.h"
#include "moe_params.h"

#define MOE_WARPS 8
#define MOE_MAX_SMEM_FLOATS 12288  // 48 KiB of shared memory for x

__device__ __forceinline__ float moe_load(const moe_bf16 *p, long i, long dtype) {
    return dtype == 0 ? moe_bf16_to_f32(p[i]) : moe_f16_to_f32(p[i]);
}

__device__ __forceinline__ void moe_unpack8(uint4 v, long dtype, float *out) {
    unsigned int w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int q = 0; q < 4; q++) {
        moe_bf16 lo = (moe_bf16)(w[q] & 0xffffu), hi = (moe_bf16)(w[q] >> 16);
        out[2 * q] = dtype == 0 ? moe_bf16_to_f32(lo) : moe_f16_to_f32(lo);
        out[2 * q + 1] = dtype == 0 ? moe_bf16_to_f32(hi) : moe_f16_to_f32(hi);
    }
}

// Rounds x to the activation dtype and back.
__device__ __forceinline__ float moe_round(float x, long dtype) {
    return dtype == 0 ? moe_bf16_to_f32(moe_f32_to_bf16(x)) : moe_f16_to_f32(moe_f32_to_f16(x));
}

__device__ __forceinline__ float moe_warp_sum(float v) {
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) v += MOE_SHFL_XOR(v, m);
    return v;
}

// dot of a weight row (n elements, dtype) with a f32 vector; vectorised when
// the row is 16-byte aligned and n is a multiple of 8.
__device__ __forceinline__ float moe_row_dot(const moe_bf16 *row, const float *vec, long n, long dtype, unsigned int lane) {
    float acc = 0.f;
    if ((n & 7) == 0 && (((unsigned long)row) & 15) == 0) {
        const uint4 *r4 = (const uint4 *)row;
        for (long c = lane; c < n / 8; c += 32) {
            float w[8];
            moe_unpack8(r4[c], dtype, w);
            const float *v = vec + c * 8;
#pragma unroll
            for (int q = 0; q < 8; q++) acc += w[q] * v[q];
        }
    } else {
        for (long c = lane; c < n; c += 32) acc += moe_load(row, c, dtype) * vec[c];
    }
    return moe_warp_sum(acc);
}

extern "C" __global__ void moe_gate_up_swiglu(const moe_gate_up_params prm) {
    const moe_bf16 *x = (const moe_bf16 *)prm.x;
    const long *topk = (const long *)prm.top_k;
    const unsigned long *gtab = (const unsigned long *)prm.gate_tab, *utab = (const unsigned long *)prm.up_tab;
    float *h = (float *)prm.scratch;
    long P = prm.p, K = prm.k, H = prm.hidden, I = prm.inter, dtype = prm.dtype, E = prm.e;
    const unsigned char *skip = (const unsigned char *)prm.skip;
    __shared__ float xs[MOE_MAX_SMEM_FLOATS];
    long p = MOE_CTAID_Y;
    if (p >= P) return;
    long t = p / K;
    const moe_bf16 *xt = x + t * H;
    bool staged = H <= MOE_MAX_SMEM_FLOATS;
    if (staged) {
        for (long c = MOE_TID_X; c < H; c += MOE_NTID_X) xs[c] = moe_load(xt, c, dtype);
        __syncthreads();
    }
    unsigned int lane = MOE_TID_X & 31u, warp = MOE_TID_X >> 5;
    long i = (long)MOE_CTAID_X * MOE_WARPS + warp;
    if (i >= I) return;
    long e = topk[p];
    if (e < 0 || e >= E || gtab[e] == 0 || (skip && skip[e])) {
        if (lane == 0) h[p * I + i] = 0.f;
        return;
    }
    const moe_bf16 *wg = (const moe_bf16 *)gtab[e] + i * H;
    const moe_bf16 *wu = (const moe_bf16 *)utab[e] + i * H;
    float g, u;
    if (staged) {
        g = moe_row_dot(wg, xs, H, dtype, lane);
        u = moe_row_dot(wu, xs, H, dtype, lane);
    } else {
        g = 0.f;
        u = 0.f;
        for (long c = lane; c < H; c += 32) {
            float xv = moe_load(xt, c, dtype);
            g += moe_load(wg, c, dtype) * xv;
            u += moe_load(wu, c, dtype) * xv;
        }
        g = moe_warp_sum(g);
        u = moe_warp_sum(u);
    }
    if (lane == 0) {
        g = moe_round(g, dtype);
        u = moe_round(u, dtype);
        float act = moe_round(g / (1.f + MOE_EXPF(-g)), dtype);
        h[p * I + i] = moe_round(act * u, dtype);
    }
}

// weight is [T, K] routing weights of dtype wdtype (0 bfloat16, 1 float16,
// 2 float32), so the router's output is read as it is.
extern "C" __global__ void moe_down(const moe_down_params prm) {
    const float *h = (const float *)prm.scratch;
    const long *topk = (const long *)prm.top_k;
    const unsigned long *wtab = (const unsigned long *)prm.down_tab;
    const void *weight = (const void *)prm.weights;
    moe_bf16 *out = (moe_bf16 *)prm.out;
    long T = prm.t, K = prm.k, H = prm.hidden, I = prm.inter, dtype = prm.dtype, E = prm.e, wdtype = prm.wdtype;
    const float *addend = (const float *)prm.addend;
    const unsigned char *skip = (const unsigned char *)prm.skip;
    long t = MOE_CTAID_Y;
    unsigned int lane = MOE_TID_X & 31u, warp = MOE_TID_X >> 5;
    long r = (long)MOE_CTAID_X * MOE_WARPS + warp;
    if (t >= T || r >= H) return;
    float acc = 0.f;
    for (long j = 0; j < K; j++) {
        long p = t * K + j;
        long e = topk[p];
        if (e < 0 || e >= E || wtab[e] == 0 || (skip && skip[e])) continue;
        const moe_bf16 *w = (const moe_bf16 *)wtab[e];
        float wp = wdtype == 2 ? ((const float *)weight)[p] : moe_load((const moe_bf16 *)weight, p, wdtype);
        acc += wp * moe_round(moe_row_dot(w + r * I, h + p * I, I, dtype, lane), dtype);
    }
    if (addend && (!skip || skip[E])) acc += addend[t * H + r];
    if (lane == 0) out[t * H + r] = dtype == 0 ? moe_f32_to_bf16(acc) : moe_f32_to_f16(acc);
}

// FP8 block-scaled experts (DeepSeek-V3/R1, Qwen3-*-FP8), read straight
// from their compressed bytes: the tables point at float8_e4m3fn rows (one
// byte per element, row-major as stored: gate and up [I, H], down [H, I]),
// and tables beside them (gstab, ustab, dstab) at each matrix's float32
// weight_scale_inv grid [ceil(rows/br), ceil(cols/bc)]: in the expert's
// slot, or in mapped mode wherever the checkpoint keeps it in host memory
// (a tensor of its own, 4-byte aligned). urow0 is up's first row in its
// grid (I when gate and up are the halves of one fused weight with one
// grid, so gstab[e] == ustab[e], else 0). Each weight element is dequantized as transformers
// dequantizes the checkpoint: fp8 value × its block's scale in f32, rounded
// to the activation dtype; from there the kernels are the bf16/f16 ones
// (same pairs, warps, reductions and rounding), so they compute what the
// bf16 kernels compute on the dequantized experts, moving half the bytes.
// The engine's CPU reference (go/backend, FP8Args) does the same
// arithmetic.

// Exact float8_e4m3fn decode (no infinities; 0x7f/0xff are NaN), in
// software: sm_80 has no fp8 conversion instruction.
__device__ __forceinline__ float moe_fp8_to_f32(unsigned int b) {
    unsigned int sign = (b & 0x80u) << 24, e = (b >> 3) & 15u, m = b & 7u;
    if (e == 15u && m == 7u) return __builtin_bit_cast(float, 0x7fc00000u | sign);
    if (e == 0u) return __builtin_bit_cast(float, __builtin_bit_cast(unsigned int, (float)m * 0.001953125f) | sign);
    return __builtin_bit_cast(float, sign | ((e + 120u) << 23) | (m << 20));
}

// The sm_89 build (go/backend/cuda/moe_ffn_sm89.ptx, PTX ISA 8.1; Ada and
// Hopper) decodes two bytes with one hardware conversion,
// cvt.rn.f16x2.e4m3x2 (low byte to the low half), then each half to f32
// with cvt.f32.f16. Both steps are exact for every non-NaN byte (every
// e4m3 value is a normal f16 or zero), so the f32 is moe_fp8_to_f32's bit
// for bit (checked on the CPU for all 256 bytes: go/backend/cuda,
// TestHardwareE4M3ModelMatchesTheSoftwareDecode). The hardware's NaN is
// f16's canonical one (sign dropped), not moe_fp8_to_f32's, so 16 bytes
// holding a NaN byte take the software decode: the f32 values, and from
// there the arithmetic, are the sm_80 build's for every byte.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
#define MOE_FP8_HW 1

// Two e4m3 bytes (b2's low 16 bits, low byte first) as two f32.
__device__ __forceinline__ void moe_fp8x2_to_f32(unsigned int b2, float *lo, float *hi) {
    unsigned int h2;
    unsigned short in = (unsigned short)(b2 & 0xffffu);
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"(in));
    asm("cvt.f32.f16 %0, %1;" : "=f"(*lo) : "h"((unsigned short)(h2 & 0xffffu)));
    asm("cvt.f32.f16 %0, %1;" : "=f"(*hi) : "h"((unsigned short)(h2 >> 16)));
}

// Whether any of w's four bytes is an e4m3 NaN (low 7 bits all ones): the
// +1 carries into a byte's bit 7 exactly then, and never across bytes.
__device__ __forceinline__ unsigned int moe_fp8_nan4(unsigned int w) {
    return ((w & 0x7f7f7f7fu) + 0x01010101u) & 0x80808080u;
}
#endif

// dot of row `row` of an FP8 matrix (n columns, scale grid sg, rows of the
// grid counted from row0) with a f32 vector. Lanes take 16 columns at a
// time with one 16-byte load when the row allows it (in the sm_89 build
// decoded by the hardware, two bytes a conversion; other rows byte by byte
// in software in both builds).
__device__ __forceinline__ float moe_fp8_row_dot(const unsigned char *w, const float *sg, long row0, long row,
                                                 const float *vec, long n, long br, long bc, long dtype, unsigned int lane) {
    const unsigned char *r = w + row * n;
    const float *s = sg + ((row0 + row) / br) * ((n + bc - 1) / bc);
    float acc = 0.f;
    if ((n & 15) == 0 && (bc & 15) == 0 && (((unsigned long)r) & 15) == 0) {
        const uint4 *r4 = (const uint4 *)r;
        for (long c = lane; c < n / 16; c += 32) {
            uint4 v = r4[c];
            unsigned int q[4] = {v.x, v.y, v.z, v.w};
            float sc = s[(c * 16) / bc];
            const float *x = vec + c * 16;
#ifdef MOE_FP8_HW
            float f[16];
            if (moe_fp8_nan4(q[0]) | moe_fp8_nan4(q[1]) | moe_fp8_nan4(q[2]) | moe_fp8_nan4(q[3])) {
#pragma unroll
                for (int k = 0; k < 16; k++) f[k] = moe_fp8_to_f32((q[k >> 2] >> (8 * (k & 3))) & 0xffu);
            } else {
#pragma unroll
                for (int k = 0; k < 16; k += 2) moe_fp8x2_to_f32(q[k >> 2] >> (8 * (k & 3)), &f[k], &f[k + 1]);
            }
#pragma unroll
            for (int k = 0; k < 16; k++) acc += moe_round(f[k] * sc, dtype) * x[k];
#else
#pragma unroll
            for (int k = 0; k < 16; k++) acc += moe_round(moe_fp8_to_f32((q[k >> 2] >> (8 * (k & 3))) & 0xffu) * sc, dtype) * x[k];
#endif
        }
    } else {
        for (long c = lane; c < n; c += 32) acc += moe_round(moe_fp8_to_f32(r[c]) * s[c / bc], dtype) * vec[c];
    }
    return moe_warp_sum(acc);
}

extern "C" __global__ void moe_gate_up_swiglu_fp8(const moe_gate_up_params prm) {
    const moe_bf16 *x = (const moe_bf16 *)prm.x;
    const long *topk = (const long *)prm.top_k;
    const unsigned long *gtab = (const unsigned long *)prm.gate_tab, *utab = (const unsigned long *)prm.up_tab;
    float *h = (float *)prm.scratch;
    long P = prm.p, K = prm.k, H = prm.hidden, I = prm.inter, dtype = prm.dtype, E = prm.e;
    long br = prm.block_rows, bc = prm.block_cols;
    const unsigned long *gstab = (const unsigned long *)prm.gate_scale_tab, *ustab = (const unsigned long *)prm.up_scale_tab;
    long urow0 = prm.up_row0;
    __shared__ float xs[MOE_MAX_SMEM_FLOATS];
    long p = MOE_CTAID_Y;
    if (p >= P || H > MOE_MAX_SMEM_FLOATS) return;  // the host refuses such H
    long t = p / K;
    const moe_bf16 *xt = x + t * H;
    for (long c = MOE_TID_X; c < H; c += MOE_NTID_X) xs[c] = moe_load(xt, c, dtype);
    __syncthreads();
    unsigned int lane = MOE_TID_X & 31u, warp = MOE_TID_X >> 5;
    long i = (long)MOE_CTAID_X * MOE_WARPS + warp;
    if (i >= I) return;
    long e = topk[p];
    if (e < 0 || e >= E || gtab[e] == 0) {
        if (lane == 0) h[p * I + i] = 0.f;
        return;
    }
    float g = moe_fp8_row_dot((const unsigned char *)gtab[e], (const float *)gstab[e], 0, i, xs, H, br, bc, dtype, lane);
    float u = moe_fp8_row_dot((const unsigned char *)utab[e], (const float *)ustab[e], urow0, i, xs, H, br, bc, dtype, lane);
    if (lane == 0) {
        g = moe_round(g, dtype);
        u = moe_round(u, dtype);
        float act = moe_round(g / (1.f + MOE_EXPF(-g)), dtype);
        h[p * I + i] = moe_round(act * u, dtype);
    }
}

extern "C" __global__ void moe_down_fp8(const moe_down_params prm) {
    const float *h = (const float *)prm.scratch;
    const long *topk = (const long *)prm.top_k;
    const unsigned long *wtab = (const unsigned long *)prm.down_tab;
    const void *weight = (const void *)prm.weights;
    moe_bf16 *out = (moe_bf16 *)prm.out;
    long T = prm.t, K = prm.k, H = prm.hidden, I = prm.inter, dtype = prm.dtype, E = prm.e, wdtype = prm.wdtype;
    const float *addend = (const float *)prm.addend;
    long br = prm.block_rows, bc = prm.block_cols;
    const unsigned long *dstab = (const unsigned long *)prm.down_scale_tab;
    long t = MOE_CTAID_Y;
    unsigned int lane = MOE_TID_X & 31u, warp = MOE_TID_X >> 5;
    long r = (long)MOE_CTAID_X * MOE_WARPS + warp;
    if (t >= T || r >= H) return;
    float acc = 0.f;
    for (long j = 0; j < K; j++) {
        long p = t * K + j;
        long e = topk[p];
        if (e < 0 || e >= E || wtab[e] == 0) continue;
        float wp = wdtype == 2 ? ((const float *)weight)[p] : moe_load((const moe_bf16 *)weight, p, wdtype);
        const unsigned char *w = (const unsigned char *)wtab[e];
        acc += wp * moe_round(moe_fp8_row_dot(w, (const float *)dstab[e], 0, r, h + p * I, I, br, bc, dtype, lane), dtype);
    }
    if (addend) acc += addend[t * H + r];
    if (lane == 0) out[t * H + r] = dtype == 0 ? moe_f32_to_bf16(acc) : moe_f32_to_f16(acc);
}

// gpt-oss experts (transformers' GptOssExperts; Go: backend.GptOssArgs,
// whose CPU reference computes the same arithmetic). Not standard SwiGLU:
// the matrices are stored transposed (gate_up [H, 2I], gate and up columns
// interleaved: gate = column 2i, up = column 2i+1; down [I, H]), both
// projections have biases (btab: gate_up_proj_bias [2I], dbtab:
// down_proj_bias [H], in the activation dtype), and the activation clamps:
//
//   gu   = round(round(x · Wgu) + b)                     (each of the 2I columns)
//   g, u = min(gu[2i], limit), clamp(gu[2i+1], ±limit)
//   h    = round(round(u + 1) · round(g · round(sigmoid(round(g · alpha)))))
//   o    = round(round(h · Wd) + bd);  o·w rounded too unless w is float32
//   out  = Σ_j o_j · w_j in f32, rounded once
//
// as transformers' grouped_mm expert code rounds on bfloat16/float16
// tensors. alpha and limit arrive as the bits of a float32 in a long.
//
// bfloat16/float16 experts: each lane owns one output column (32 per
// block, so a warp's loads of a row are one coalesced run; elements are
// loaded one by one, so a matrix read in place needs no more alignment than
// its elements') and the block's
// 8 warps split the rows (warp w takes rows w, w+8, ...); their partial
// sums meet in shared memory and warp 0 adds them in warp order. MXFP4
// experts (quant_method "mxfp4", as gpt-oss ships) are read as stored: the
// blocks are the transposes, gate_up [2I, H/32, 16] and down [H, I/32, 16]
// (two e2m1 values a byte, low nibble first), with e8m0 scales (gstab,
// dstab: [2I, H/32], [H, I/32] bytes), so a warp computes one output row
// as moe_row_dot does, each lane taking 32 values (16 bytes and one scale)
// at a time, every value dequantized as transformers' dequantizing load
// does (e2m1 × 2^(s-127), rounded to the activation dtype) before its
// product.

// e2m1 (FP4): sign bit 3, exponent bits 2..1 (bias 1), mantissa bit 0.
__device__ __forceinline__ float moe_e2m1_to_f32(unsigned int n) {
    unsigned int e = (n >> 1) & 3u, m = n & 1u;
    float v = e == 0u ? 0.5f * (float)m : (1.0f + 0.5f * (float)m) * (float)(1u << (e - 1u));
    return (n & 8u) ? -v : v;
}

// e8m0: 2^(s-127); 255 is NaN (the CPU dequantizer reports it as an error).
// Both decodes serve the MXFP4 kernels and the MXFP4 view kernel below.
__device__ __forceinline__ float moe_e8m0_to_f32(unsigned int s) {
    if (s == 255u) return __builtin_bit_cast(float, 0x7fc00000u);
    return __builtin_bit_cast(float, s == 0u ? 0x00400000u : s << 23);
}

__device__ __forceinline__ float moe_bits_f32(long bits) { return __builtin_bit_cast(float, (unsigned int)bits); }

// GptOssExperts._apply_gate on one (gate, up) pair already rounded, plus
// the rounding of each step; NaN passes the clamps as in torch.
__device__ __forceinline__ float moe_gptoss_gate(float g, float u, float alpha, float limit, long dtype) {
    g = g > limit ? limit : g;
    u = u > limit ? limit : (u < -limit ? -limit : u);
    float ga = moe_round(g * alpha, dtype);
    float sig = moe_round(1.f / (1.f + MOE_EXPF(-ga)), dtype);
    float glu = moe_round(g * sig, dtype);
    return moe_round(moe_round(u + 1.f, dtype) * glu, dtype);
}

// A pair's routed output: o (rounded, bias added and rounded) times its
// routing weight, rounded to the activation dtype when the weight is one.
__device__ __forceinline__ float moe_gptoss_weighted(float o, const void *weight, long p, long wdtype, long dtype) {
    if (wdtype == 2) return ((const float *)weight)[p] * o;
    return moe_round(moe_load((const moe_bf16 *)weight, p, wdtype) * o, dtype);
}

// x is staged in what the 48 KiB of static shared memory leave beside the
// warps' partial sums (11776 floats: gpt-oss-120b's H = 2880 fits).
#define MOE_GPTOSS_SMEM_FLOATS (MOE_MAX_SMEM_FLOATS - MOE_WARPS * 32 * 2)

extern "C" __global__ void moe_gate_up_gptoss(const moe_gptoss_gate_up_params prm) {
    const moe_bf16 *x = (const moe_bf16 *)prm.x;
    const long *topk = (const long *)prm.top_k;
    const unsigned long *gutab = (const unsigned long *)prm.gate_up_tab, *btab = (const unsigned long *)prm.bias_tab;
    float *h = (float *)prm.scratch;
    long P = prm.p, K = prm.k, H = prm.hidden, I = prm.inter, dtype = prm.dtype, E = prm.e;
    long alpha_bits = prm.alpha_bits, limit_bits = prm.limit_bits;
    __shared__ float xs[MOE_GPTOSS_SMEM_FLOATS];
    __shared__ float part[MOE_WARPS][32][2];
    long p = MOE_CTAID_Y;
    if (p >= P) return;
    unsigned int lane = MOE_TID_X & 31u, warp = MOE_TID_X >> 5;
    long i = (long)MOE_CTAID_X * 32 + lane;
    long e = topk[p];
    if (e < 0 || e >= E || gutab[e] == 0 || btab[e] == 0) {  // the same for the whole block
        if (warp == 0 && i < I) h[p * I + i] = 0.f;
        return;
    }
    const moe_bf16 *xt = x + (p / K) * H;
    bool staged = H <= MOE_GPTOSS_SMEM_FLOATS;
    if (staged) {
        for (long c = MOE_TID_X; c < H; c += MOE_NTID_X) xs[c] = moe_load(xt, c, dtype);
        __syncthreads();
    }
    // Columns 2i (gate) and 2i+1 (up) of row c: two 2-byte loads, so that
    // a matrix read in place needs only its elements' alignment.
    const moe_bf16 *w = (const moe_bf16 *)gutab[e];
    float g = 0.f, u = 0.f;
    if (i < I) {
        for (long c = warp; c < H; c += MOE_WARPS) {
            const moe_bf16 *wc = w + c * 2 * I + 2 * i;
            float xv = staged ? xs[c] : moe_load(xt, c, dtype);
            g += moe_load(wc, 0, dtype) * xv;
            u += moe_load(wc, 1, dtype) * xv;
        }
    }
    part[warp][lane][0] = g;
    part[warp][lane][1] = u;
    __syncthreads();
    if (warp != 0 || i >= I) return;
    g = 0.f;
    u = 0.f;
    for (int k = 0; k < MOE_WARPS; k++) {
        g += part[k][lane][0];
        u += part[k][lane][1];
    }
    const moe_bf16 *b = (const moe_bf16 *)btab[e];
    g = moe_round(moe_round(g, dtype) + moe_load(b, 2 * i, dtype), dtype);
    u = moe_round(moe_round(u, dtype) + moe_load(b, 2 * i + 1, dtype), dtype);
    h[p * I + i] = moe_gptoss_gate(g, u, moe_bits_f32(alpha_bits), moe_bits_f32(limit_bits), dtype);
}

extern "C" __global__ void moe_down_gptoss(const moe_gptoss_down_params prm) {
    const float *h = (const float *)prm.scratch;
    const long *topk = (const long *)prm.top_k;
    const unsigned long *dtab = (const unsigned long *)prm.down_tab, *dbtab = (const unsigned long *)prm.bias_tab;
    const void *weight = (const void *)prm.weights;
    moe_bf16 *out = (moe_bf16 *)prm.out;
    long T = prm.t, K = prm.k, H = prm.hidden, I = prm.inter, dtype = prm.dtype, E = prm.e, wdtype = prm.wdtype;
    __shared__ float part[MOE_WARPS][32];
    long t = MOE_CTAID_Y;
    if (t >= T) return;
    unsigned int lane = MOE_TID_X & 31u, warp = MOE_TID_X >> 5;
    long r = (long)MOE_CTAID_X * 32 + lane;
    float acc = 0.f;
    for (long j = 0; j < K; j++) {
        long p = t * K + j;
        long e = topk[p];
        if (e < 0 || e >= E || dtab[e] == 0 || dbtab[e] == 0) continue;  // the same for the whole block
        const moe_bf16 *w = (const moe_bf16 *)dtab[e];
        const float *hp = h + p * I;
        float d = 0.f;
        if (r < H) {
            for (long i = warp; i < I; i += MOE_WARPS) d += moe_load(w, i * H + r, dtype) * hp[i];
        }
        part[warp][lane] = d;
        __syncthreads();
        if (warp == 0 && r < H) {
            d = 0.f;
            for (int k = 0; k < MOE_WARPS; k++) d += part[k][lane];
            float o = moe_round(moe_round(d, dtype) + moe_load((const moe_bf16 *)dbtab[e], r, dtype), dtype);
            acc += moe_gptoss_weighted(o, weight, p, wdtype, dtype);
        }
        __syncthreads();  // part is reused by the next pair
    }
    if (warp == 0 && r < H) out[t * H + r] = dtype == 0 ? moe_f32_to_bf16(acc) : moe_f32_to_f16(acc);
}

// dot of row `row` of an MXFP4 matrix (n columns, a multiple of 32; blocks
// at w, e8m0 scales at s) with a f32 vector: lane takes 32 columns (16
// bytes, one scale) at a time, with one 16-byte load when the row is
// 16-byte aligned (in a slot always; read in place, as the checkpoint
// file places it) and byte by byte otherwise.
__device__ __forceinline__ float moe_mxfp4_row_dot(const unsigned char *w, const unsigned char *s, long row,
                                                   const float *vec, long n, long dtype, unsigned int lane) {
    long groups = n / 32;
    const unsigned char *rb = w + row * (n / 2);
    bool aligned = (((unsigned long)rb) & 15) == 0;
    const unsigned char *sr = s + row * groups;
    float acc = 0.f;
    for (long gi = lane; gi < groups; gi += 32) {
        unsigned int q[4];
        if (aligned) {
            uint4 v = ((const uint4 *)rb)[gi];
            q[0] = v.x;
            q[1] = v.y;
            q[2] = v.z;
            q[3] = v.w;
        } else {
            const unsigned char *b = rb + gi * 16;
#pragma unroll
            for (int k = 0; k < 4; k++)
                q[k] = b[4 * k] | (b[4 * k + 1] << 8) | (b[4 * k + 2] << 16) | ((unsigned int)b[4 * k + 3] << 24);
        }
        float sc = moe_e8m0_to_f32(sr[gi]);
        const float *x = vec + gi * 32;
#pragma unroll
        for (int wq = 0; wq < 4; wq++) {
            unsigned int word = q[wq];
#pragma unroll 1
            for (int k = 0; k < 4; k++, word >>= 8) {
                const float *xk = x + 8 * wq + 2 * k;
                acc += moe_round(moe_e2m1_to_f32(word & 15u) * sc, dtype) * xk[0];
                acc += moe_round(moe_e2m1_to_f32((word >> 4) & 15u) * sc, dtype) * xk[1];
            }
        }
    }
    return moe_warp_sum(acc);
}

extern "C" __global__ void moe_gate_up_gptoss_mxfp4(const moe_gptoss_gate_up_params prm) {
    const moe_bf16 *x = (const moe_bf16 *)prm.x;
    const long *topk = (const long *)prm.top_k;
    const unsigned long *gutab = (const unsigned long *)prm.gate_up_tab, *btab = (const unsigned long *)prm.bias_tab;
    float *h = (float *)prm.scratch;
    long P = prm.p, K = prm.k, H = prm.hidden, I = prm.inter, dtype = prm.dtype, E = prm.e;
    long alpha_bits = prm.alpha_bits, limit_bits = prm.limit_bits;
    const unsigned long *gstab = (const unsigned long *)prm.scale_tab;
    __shared__ float xs[MOE_MAX_SMEM_FLOATS];
    long p = MOE_CTAID_Y;
    if (p >= P || H > MOE_MAX_SMEM_FLOATS) return;  // the host refuses such H
    long t = p / K;
    const moe_bf16 *xt = x + t * H;
    for (long c = MOE_TID_X; c < H; c += MOE_NTID_X) xs[c] = moe_load(xt, c, dtype);
    __syncthreads();
    unsigned int lane = MOE_TID_X & 31u, warp = MOE_TID_X >> 5;
    long i = (long)MOE_CTAID_X * MOE_WARPS + warp;
    if (i >= I) return;
    long e = topk[p];
    if (e < 0 || e >= E || gutab[e] == 0 || btab[e] == 0 || gstab[e] == 0) {
        if (lane == 0) h[p * I + i] = 0.f;
        return;
    }
    const unsigned char *w = (const unsigned char *)gutab[e], *s = (const unsigned char *)gstab[e];
    float g = moe_mxfp4_row_dot(w, s, 2 * i, xs, H, dtype, lane);
    float u = moe_mxfp4_row_dot(w, s, 2 * i + 1, xs, H, dtype, lane);
    if (lane == 0) {
        const moe_bf16 *b = (const moe_bf16 *)btab[e];
        g = moe_round(moe_round(g, dtype) + moe_load(b, 2 * i, dtype), dtype);
        u = moe_round(moe_round(u, dtype) + moe_load(b, 2 * i + 1, dtype), dtype);
        h[p * I + i] = moe_gptoss_gate(g, u, moe_bits_f32(alpha_bits), moe_bits_f32(limit_bits), dtype);
    }
}

extern "C" __global__ void moe_down_gptoss_mxfp4(const moe_gptoss_down_params prm) {
    const float *h = (const float *)prm.scratch;
    const long *topk = (const long *)prm.top_k;
    const unsigned long *dtab = (const unsigned long *)prm.down_tab, *dbtab = (const unsigned long *)prm.bias_tab;
    const void *weight = (const void *)prm.weights;
    moe_bf16 *out = (moe_bf16 *)prm.out;
    long T = prm.t, K = prm.k, H = prm.hidden, I = prm.inter, dtype = prm.dtype, E = prm.e, wdtype = prm.wdtype;
    const unsigned long *dstab = (const unsigned long *)prm.scale_tab;
    long t = MOE_CTAID_Y;
    unsigned int lane = MOE_TID_X & 31u, warp = MOE_TID_X >> 5;
    long r = (long)MOE_CTAID_X * MOE_WARPS + warp;
    if (t >= T || r >= H) return;
    float acc = 0.f;
    for (long j = 0; j < K; j++) {
        long p = t * K + j;
        long e = topk[p];
        if (e < 0 || e >= E || dtab[e] == 0 || dbtab[e] == 0 || dstab[e] == 0) continue;
        float d = moe_mxfp4_row_dot((const unsigned char *)dtab[e], (const unsigned char *)dstab[e], r, h + p * I, I, dtype, lane);
        float o = moe_round(moe_round(d, dtype) + moe_load((const moe_bf16 *)dbtab[e], r, dtype), dtype);
        acc += moe_gptoss_weighted(o, weight, p, wdtype, dtype);
    }
    if (lane == 0) out[t * H + r] = dtype == 0 ? moe_f32_to_bf16(acc) : moe_f32_to_f16(acc);
}

// Points one expert at new memory in stream order: its n table entries
// (gate, up and down rows, then for FP8 experts their scale grids; n <= 6),
// entry j at first[j * stride], set to v[j] by one thread. An eviction runs
// it on the compute stream (kernels before it read the old slot, kernels
// after it read host memory); an install runs it on the copy stream right
// after the copy (a kernel racing with it reads either copy of the same
// bytes).
extern "C" __global__ void moe_table_set(unsigned long *first, long stride, long n, unsigned long v0, unsigned long v1,
                                         unsigned long v2, unsigned long v3, unsigned long v4, unsigned long v5) {
    if (MOE_TID_X == 0 && MOE_CTAID_X == 0) {
        unsigned long v[6] = {v0, v1, v2, v3, v4, v5};
        for (long j = 0; j < n && j < 6; j++) first[j * stride] = v[j];
    }
}

// Copy mode (graph replays whose misses the copy engine brings in): a
// captured layer publishes its routing to the host, then waits until the
// host has copied the layer's missed experts into slots and said so.
//
// moe_publish_wait copies n routing ids to box (pinned host memory the GPU
// can write), advances *counter (device memory, one per captured layer)
// and writes the new value to *seq (pinned host memory) after a
// system-wide fence, so a host that sees the new value sees the ids. Then
// it holds its stream until *ready (device memory, set by moe_answer on
// the host's copy stream after the layer's copies) has reached the new
// value, or until timeout_ns of GPU time have passed: then it writes the
// value it gave up on to *late (pinned host memory) and returns, and the
// layer reads its missed experts in place from host memory (its table
// entries always point at valid memory). The GPU time it held the stream
// is added to *wait_acc (device memory) and the running total written to
// *wait_host (pinned host memory; the engine's measure of how long layers
// wait for their copies and the host's reaction). One block.
//
// The CPU hand-off (hybrid execution inside replays): with xn > 0 it also
// publishes xn 2-byte words of activations x and wn of routing weights w
// to xbox and wbox (pinned) before the fence; with skip_n > 0, once the
// wait ends it copies skip_n words of the host's skip list (pinned: one
// byte per expert, set for the experts the CPU computed, then one byte
// set when the CPU's partial output is written) to skip_dev, the list the
// layer's kernels read, or zeroes skip_dev when the wait timed out: the
// kernels then skip nothing and add no partial.
extern "C" __global__ void moe_publish_wait(const long *topk, long n, volatile long *box, volatile unsigned int *seq,
                                            unsigned int *counter, const volatile unsigned int *ready, long timeout_ns,
                                            volatile unsigned int *late, unsigned long *wait_acc,
                                            volatile unsigned long *wait_host, const unsigned short *x, long xn,
                                            const unsigned short *w, long wn, volatile unsigned short *xbox,
                                            volatile unsigned short *wbox, const volatile unsigned int *skip_host,
                                            unsigned int *skip_dev, long skip_n) {
    __shared__ unsigned int answered;
    for (long i = MOE_TID_X; i < n; i += MOE_NTID_X) box[i] = topk[i];
    for (long i = MOE_TID_X; i < xn; i += MOE_NTID_X) xbox[i] = x[i];
    for (long i = MOE_TID_X; i < wn; i += MOE_NTID_X) wbox[i] = w[i];
    MOE_FENCE_SYSTEM();
    __syncthreads();
    if (MOE_TID_X == 0) {
        unsigned int c = *counter + 1;
        *counter = c;
        MOE_FENCE_SYSTEM();
        *seq = c;
        answered = 1u;
        unsigned long t0 = moe_globaltimer();
        while ((int)(*ready - c) < 0) {
            if ((long)(moe_globaltimer() - t0) > timeout_ns) {
                *late = c;
                MOE_FENCE_SYSTEM();
                answered = 0u;
                break;
            }
            moe_nanosleep(256);
        }
        unsigned long wt = *wait_acc + (moe_globaltimer() - t0);
        *wait_acc = wt;
        *wait_host = wt;
    }
    if (skip_n <= 0) return;
    __syncthreads();
    for (long i = MOE_TID_X; i < skip_n; i += MOE_NTID_X) skip_dev[i] = answered ? skip_host[i] : 0u;
}

// moe_answer ends the host's service of one copy-mode layer, on the copy
// stream after the layer's copies: it writes n (address, value) pairs of
// table entries (the experts copied in pointed at their slots, the experts
// they evicted back at host memory), read from pinned host memory, then
// sets *ready = seq, which releases the layer's moe_publish_wait. One block.
extern "C" __global__ void moe_answer(const unsigned long *pairs, long n, volatile unsigned int *ready, long seq) {
    for (long k = MOE_TID_X; k < n; k += MOE_NTID_X) *(unsigned long *)pairs[2 * k] = pairs[2 * k + 1];
    MOE_FENCE_DEVICE();
    __syncthreads();
    if (MOE_TID_X == 0) *ready = (unsigned int)seq;
}

// moe_link_read is the engine's measure of how fast kernels read pinned
// host memory in place (zero copy), for the choice between reading missed
// experts in place and copying them (Go: the CUDA backend's MeasureLink).
// It reads the way moe_row_dot reads a weight row: warp w of block b reads
// row b·(ntid/32)+w of src (row16 16-byte words), its lanes striding by 32
// words with 16-byte loads. What it reads is folded into a value written to
// *out only when it equals a magic number, so that no load is dropped.
extern "C" __global__ void moe_link_read(const uint4 *src, long rows, long row16, unsigned int *out) {
    unsigned int lane = MOE_TID_X & 31u, warp = MOE_TID_X >> 5;
    long r = (long)MOE_CTAID_X * (MOE_NTID_X >> 5) + warp;
    if (r >= rows) return;
    const uint4 *p = src + r * row16;
    unsigned int acc = 0;
    for (long c = lane; c < row16; c += 32) {
        uint4 v = p[c];
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x9e3779b9u) out[0] = acc;
}

// Dequantized views of quantized experts (the CUDA side of
// layout.ExpandOp; Go: go/backend/cuda/views.go). Each kernel writes one
// part of a view image in device memory from an expert's slot image (the
// checkpoint's bytes), computing what the engine's CPU code (package
// quant) and transformers' dequantizing load compute: every element in
// float32, rounded once to the view's dtype vt (0 bfloat16, 1 float16,
// 2 float32), nearest even. Bit for bit the CPU's, except NaN payloads.
// Grid-stride loops over the output's elements.

__device__ __forceinline__ float moe_view_load(const unsigned char *p, long i, long t) {
    if (t == 2) return ((const float *)p)[i];
    moe_bf16 v = ((const moe_bf16 *)p)[i];
    return t == 0 ? moe_bf16_to_f32(v) : moe_f16_to_f32(v);
}

__device__ __forceinline__ void moe_view_store(unsigned char *p, long i, long t, float v) {
    if (t == 2) {
        ((float *)p)[i] = v;
    } else {
        ((moe_bf16 *)p)[i] = t == 0 ? moe_f32_to_bf16(v) : moe_f32_to_f16(v);
    }
}

#define MOE_GRID_STRIDE(i, n) \
    for (long i = (long)MOE_CTAID_X * MOE_NTID_X + MOE_TID_X; i < (n); i += (long)MOE_NCTAID_X * MOE_NTID_X)

// A plain part (a bias) converted from dtype st to vt: n elements.
extern "C" __global__ void moe_view_convert(unsigned char *dst, long vt, const unsigned char *src, long st, long n) {
    MOE_GRID_STRIDE(i, n) moe_view_store(dst, i, vt, moe_view_load(src, i, st));
}

// An FP8 block-scaled weight [rows, cols]: w[r, c] × scales[r/br, c/bc]
// (scales of dtype sct: 0 bfloat16, 2 float32), row-major like w.
extern "C" __global__ void moe_view_fp8(unsigned char *dst, long vt, const unsigned char *w, const unsigned char *scales,
                                        long sct, long rows, long cols, long br, long bc) {
    long sc = (cols + bc - 1) / bc;
    MOE_GRID_STRIDE(i, rows * cols) {
        long r = i / cols, c = i - r * cols;
        long si = (r / br) * sc + c / bc;
        float s = sct == 2 ? ((const float *)scales)[si] : moe_bf16_to_f32(((const moe_bf16 *)scales)[si]);
        moe_view_store(dst, i, vt, moe_fp8_to_f32(w[i]) * s);
    }
}

// An MXFP4 weight [rows, cols] (blocks: two e2m1 per byte, low nibble
// first; scales: one e8m0 per 32 values of a row) written transposed,
// [cols, rows], as transformers dequantizes gpt-oss experts. Threads take
// consecutive outputs, so writes coalesce.
extern "C" __global__ void moe_view_mxfp4t(unsigned char *dst, long vt, const unsigned char *blocks,
                                           const unsigned char *scales, long rows, long cols) {
    long groups = cols / 32;
    MOE_GRID_STRIDE(o, rows * cols) {
        long c = o / rows, r = o - c * rows;
        unsigned int b = blocks[(r * cols + c) >> 1];
        unsigned int n = (c & 1) ? b >> 4 : b & 15u;
        moe_view_store(dst, o, vt, moe_e2m1_to_f32(n) * moe_e8m0_to_f32(scales[r * groups + c / 32]));
    }
}
