// pcie_read.cu — microbenchmark kernels: how fast can SMs read pinned host
// memory over PCIe (zero copy), by access pattern? Used by
// benchmarks/pcie_read.py; not part of the engine.
//
// The engine's FFN kernels read a missed expert in place at ~92% of the
// copy engine's bandwidth (BENCHMARKS.md, zero-copy section). These kernels
// separate the causes: the same warp-per-row pattern as the FFN kernels,
// contiguous per-block chunks with four 16-byte loads in flight per
// thread, and Hopper's bulk asynchronous copy (TMA, cp.async.bulk) of
// 16 KiB chunks into shared memory. Every kernel folds what it reads into
// a value written only when it equals a magic number, so no load is
// optimised away. All parameters are 8 bytes (pointers and int64), as the
// driver-API launcher passes them.
//
// Built to PTX for sm_90 with clang (see benchmarks/pcie_read.py for the
// command); the bulk copy needs sm_90 and PTX ISA 8.0.

#include "compat.h"

#define PR_BULK 16384  // bytes per bulk copy

__device__ __forceinline__ unsigned int pr_fold(uint4 v) { return v.x ^ v.y ^ v.z ^ v.w; }

// Like moe_row_dot: warp w of block b reads row b·(ntid/32)+w (row16
// 16-byte words), lanes striding by 32 words.
extern "C" __global__ void pr_rows(const uint4 *src, long rows, long row16, unsigned int *out) {
    unsigned int lane = MOE_TID_X & 31u, warp = MOE_TID_X >> 5;
    long r = (long)MOE_CTAID_X * (MOE_NTID_X >> 5) + warp;
    if (r >= rows) return;
    const uint4 *p = src + r * row16;
    unsigned int acc = 0;
    for (long c = lane; c < row16; c += 32) acc ^= pr_fold(p[c]);
    if (acc == 0x9e3779b9u) out[0] = acc;
}

// Block b reads the contiguous chunk b of chunk16 words, four loads in
// flight per thread (chunk16 is a multiple of 4·ntid).
extern "C" __global__ void pr_chunks(const uint4 *src, long chunk16, unsigned int *out) {
    const uint4 *p = src + (long)MOE_CTAID_X * chunk16;
    long step = MOE_NTID_X;
    unsigned int acc = 0;
    for (long i = MOE_TID_X; i < chunk16; i += 4 * step) {
        uint4 a = p[i], b = p[i + step], c = p[i + 2 * step], d = p[i + 3 * step];
        acc ^= pr_fold(a) ^ pr_fold(b) ^ pr_fold(c) ^ pr_fold(d);
    }
    if (acc == 0x9e3779b9u) out[0] = acc;
}

__device__ __forceinline__ unsigned int pr_smem(const void *p) {
    unsigned long long a;
    asm volatile("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
    return (unsigned int)a;
}

__device__ __forceinline__ void pr_bulk_load(unsigned int dst, const void *src, unsigned int bytes, unsigned int bar) {
    unsigned long long state;
    asm volatile("mbarrier.arrive.expect_tx.shared.b64 %0, [%1], %2;" : "=l"(state) : "r"(bar), "r"(bytes) : "memory");
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(dst),
                 "l"(src), "r"(bytes), "r"(bar)
                 : "memory");
}

__device__ __forceinline__ bool pr_try_wait(unsigned int bar, unsigned int parity) {
    unsigned int ok;
    asm volatile(
        "{\n\t.reg .pred p;\n\tmbarrier.try_wait.parity.shared.b64 p, [%1], %2;\n\tselp.u32 %0, 1, 0, p;\n\t}"
        : "=r"(ok)
        : "r"(bar), "r"(parity)
        : "memory");
    return ok != 0;
}

// Chunks c = b, b + nctaid, ... of PR_BULK bytes, double-buffered in
// shared memory by bulk copies that one thread issues.
extern "C" __global__ void pr_bulk(const char *src, long nchunks, unsigned int *out) {
    __shared__ __attribute__((aligned(128))) uint4 buf[2][PR_BULK / 16];
    __shared__ __attribute__((aligned(8))) unsigned long long bar[2];
    unsigned int b0 = pr_smem(&bar[0]), b1 = pr_smem(&bar[1]);
    long c = MOE_CTAID_X, stride = MOE_NCTAID_X;
    if (MOE_TID_X == 0) {
        asm volatile("mbarrier.init.shared.b64 [%0], 1;" ::"r"(b0) : "memory");
        asm volatile("mbarrier.init.shared.b64 [%0], 1;" ::"r"(b1) : "memory");
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        if (c < nchunks) pr_bulk_load(pr_smem(buf[0]), src + c * PR_BULK, PR_BULK, b0);
        if (c + stride < nchunks) pr_bulk_load(pr_smem(buf[1]), src + (c + stride) * PR_BULK, PR_BULK, b1);
    }
    __syncthreads();
    unsigned int acc = 0, ph0 = 0, ph1 = 0;
    for (long i = 0; c < nchunks; c += stride, i++) {
        int s = (int)(i & 1);
        unsigned int b = s ? b1 : b0;
        unsigned int ph = s ? ph1 : ph0;
        while (!pr_try_wait(b, ph)) {
        }
        if (s) ph1 ^= 1u; else ph0 ^= 1u;
        for (int w = MOE_TID_X; w < PR_BULK / 16; w += MOE_NTID_X) acc ^= pr_fold(buf[s][w]);
        __syncthreads();  // buf[s] is free again
        if (MOE_TID_X == 0 && c + 2 * stride < nchunks) pr_bulk_load(pr_smem(buf[s]), src + (c + 2 * stride) * PR_BULK, PR_BULK, b);
    }
    if (acc == 0x9e3779b9u) out[0] = acc;
}
