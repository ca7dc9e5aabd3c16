// compat.h — lets the kernels compile with nvcc and with clang's CUDA
// front end without the CUDA SDK headers (clang -x cuda -nocudainc), so that
// the build can make PTX on a machine with no CUDA toolkit.
#pragma once

#if defined(__clang__) && !defined(__CUDA_ARCH_LIST__) && !defined(__NVCC__)
#define __global__ __attribute__((global))
#define __device__ __attribute__((device))
#define __shared__ __attribute__((shared))
#define __forceinline__ __attribute__((always_inline)) inline
#define MOE_TID_X __nvvm_read_ptx_sreg_tid_x()
#define MOE_TID_Y __nvvm_read_ptx_sreg_tid_y()
#define MOE_NTID_X __nvvm_read_ptx_sreg_ntid_x()
#define MOE_NTID_Y __nvvm_read_ptx_sreg_ntid_y()
#define MOE_CTAID_X __nvvm_read_ptx_sreg_ctaid_x()
#define MOE_CTAID_Y __nvvm_read_ptx_sreg_ctaid_y()
#define MOE_NCTAID_X __nvvm_read_ptx_sreg_nctaid_x()
#define MOE_SHFL_XOR(v, m) __nvvm_shfl_sync_bfly_f32(0xffffffffu, (v), (m), 0x1f)
#define MOE_EXPF(x) __nvvm_ex2_approx_f(1.4426950408889634f * (x))
struct __attribute__((aligned(16))) uint4 {
    unsigned int x, y, z, w;
};
#else
#define MOE_TID_X threadIdx.x
#define MOE_TID_Y threadIdx.y
#define MOE_NTID_X blockDim.x
#define MOE_NTID_Y blockDim.y
#define MOE_CTAID_X blockIdx.x
#define MOE_CTAID_Y blockIdx.y
#define MOE_NCTAID_X gridDim.x
#define MOE_SHFL_XOR(v, m) __shfl_xor_sync(0xffffffffu, (v), (m))
#define MOE_EXPF(x) __expf(x)
#endif

typedef unsigned short moe_bf16;  // storage of a bfloat16
typedef unsigned short moe_f16;   // storage of an IEEE half

__device__ __forceinline__ float moe_bf16_to_f32(moe_bf16 v) {
    return __builtin_bit_cast(float, (unsigned int)v << 16);
}

// Round to nearest even, NaN kept quiet (matches torch's conversion).
__device__ __forceinline__ moe_bf16 moe_f32_to_bf16(float f) {
    unsigned int u = __builtin_bit_cast(unsigned int, f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (moe_bf16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (moe_bf16)(u >> 16);
}

__device__ __forceinline__ float moe_f16_to_f32(moe_f16 h) {
    unsigned int sign = (unsigned int)(h & 0x8000u) << 16;
    unsigned int exp = (h >> 10) & 0x1fu;
    unsigned int man = h & 0x3ffu;
    unsigned int bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  // subnormal: normalise
            int e = -1;
            do {
                e++;
                man <<= 1;
            } while ((man & 0x400u) == 0);
            bits = sign | ((unsigned int)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    }
    return __builtin_bit_cast(float, bits);
}

__device__ __forceinline__ moe_f16 moe_f32_to_f16(float f) {
    unsigned int u = __builtin_bit_cast(unsigned int, f);
    unsigned int sign = (u >> 16) & 0x8000u;
    unsigned int a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (moe_f16)(sign | 0x7e00u);      // NaN
    if (a >= 0x477ff000u) return (moe_f16)(sign | 0x7c00u);     // overflow to inf
    if (a < 0x38800000u) {                                       // subnormal or zero
        if (a < 0x33000000u) return (moe_f16)sign;
        unsigned int m = (a & 0x7fffffu) | 0x800000u;
        unsigned int shift = 113u - (a >> 23) + 13u;
        unsigned int r = m >> shift;
        unsigned int rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (r & 1u))) r++;
        return (moe_f16)(sign | r);
    }
    unsigned int r = a + 0xc8000fffu + ((a >> 13) & 1u);  // rebias exponent, round to nearest even
    return (moe_f16)(sign | (r >> 13));
}

// Copy mode's synchronisation: a system-scope fence, the global nanosecond
// timer and a short sleep (sm_70 and later).
#if defined(__clang__) && !defined(__CUDA_ARCH_LIST__) && !defined(__NVCC__)
#define MOE_FENCE_SYSTEM() __nvvm_membar_sys()
#define MOE_FENCE_DEVICE() __nvvm_membar_gl()
#else
#define MOE_FENCE_SYSTEM() __threadfence_system()
#define MOE_FENCE_DEVICE() __threadfence()
#endif
__device__ __forceinline__ unsigned long moe_globaltimer() {
    unsigned long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
__device__ __forceinline__ void moe_nanosleep(unsigned int ns) { asm volatile("nanosleep.u32 %0;" ::"r"(ns)); }
