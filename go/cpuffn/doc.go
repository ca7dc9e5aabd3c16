// Package cpuffn computes the expert FFN of a MoE layer on the CPU from
// experts in host memory: SwiGLU over bfloat16 or float16 experts, with
// SIMD kernels in C (AVX2+FMA, AVX-512, AVX512-BF16 vdpbf16ps) chosen at
// run time and a portable scalar fallback, split by rows across a pool of
// goroutines that each make one cgo call per phase.
//
// Per call, for P = T·K (token, expert) pairs grouped by expert:
//
//	h[p]   = rnd(rnd(silu(rnd(Wgate·x[t]))) · rnd(Wup·x[t]))   (phase 1, rows of I)
//	out[t] = rnd_out(Σ_j w[p] · rnd(Wdown·h[p]))              (phase 2, rows of H)
//
// with rnd the rounding to the activation type after each projection, as
// transformers' low-precision expert code does. Each expert row is read
// once per call, whatever the number of tokens routed to it.
//
// Numerics against the Go reference (backend.CPU.ReferenceFFN): the scalar
// path sums each dot product in index order, as the reference does, and is
// bitwise equal to it. The SIMD paths sum in 8 or 16 float32 lanes (and
// vdpbf16ps sums product pairs, flushing denormals), so a projection's
// float32 result differs from the reference's by a few float32 ulps; after
// rounding to bfloat16/float16 most elements are equal and the rest one
// ulp apart, which the following steps carry on (see the tests' tolerance).
//
// Reads of expert rows are not guarded: a fault in C kills the process, so
// callers pass only memory that cannot fault (the CPU backend's slots,
// never a checkpoint's file mapping, which faults when the file shrinks).
//
// The kernels need cgo; without it the package is empty and the CPU
// backend computes every layer with its Go reference.
package cpuffn
