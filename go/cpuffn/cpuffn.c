// Expert FFN kernels: SwiGLU over bfloat16/float16 experts in host memory,
// float32 accumulation, transformers' rounding (see cpuffn.go). The scalar
// path is portable C; the x86-64 paths are compiled per function with
// target attributes, so the file builds with the default flags and
// cpuffn_supported decides at run time which may run.
#include "cpuffn.h"

// No contraction of a*b+c into fused multiply-adds outside the intrinsics:
// the scalar path must round as the Go reference does.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <math.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#define CPUFFN_X86 1
#endif

// ---- conversions, bit for bit those of go/dtype ----

static inline float f32_of_bits(uint32_t b) { float f; memcpy(&f, &b, 4); return f; }
static inline uint32_t bits_of_f32(float f) { uint32_t b; memcpy(&b, &f, 4); return b; }

static inline uint16_t to_bf16(float v) {
	uint32_t f = bits_of_f32(v);
	if ((f & 0x7fffffffu) > 0x7f800000u) return (uint16_t)(f >> 16) | 0x0040;
	return (uint16_t)((f + 0x7fffu + ((f >> 16) & 1u)) >> 16);
}

static inline float of_bf16(uint16_t h) { return f32_of_bits((uint32_t)h << 16); }

static inline uint16_t to_f16(float v) {
	uint32_t f = bits_of_f32(v);
	uint16_t sign = (uint16_t)(f >> 16) & 0x8000;
	uint32_t a = f & 0x7fffffffu;
	if (a >= 0x477ff000u) {
		if (a > 0x7f800000u) return sign | 0x7e00 | ((uint16_t)(a >> 13) & 0x3ff);
		return sign | 0x7c00;
	}
	if (a >= 0x38800000u) {
		a -= 112u << 23;
		return sign | (uint16_t)((a + 0xfffu + ((a >> 13) & 1u)) >> 13);
	}
	if (a <= 0x33000000u) return sign;
	uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u, shift = 126 - e;
	uint32_t r = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
	if (rem > half || (rem == half && (r & 1))) r++;
	return sign | (uint16_t)r;
}

static inline float of_f16(uint16_t h) {
	uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
	if (exp == 0x1f) return f32_of_bits(sign | 0x7f800000u | man << 13);
	if (exp == 0) {
		if (man == 0) return f32_of_bits(sign);
		uint32_t shift = 0;
		while (!(man & 0x400)) { man <<= 1; shift++; }
		return f32_of_bits(sign | (113 - shift) << 23 | (man & 0x3ff) << 13);
	}
	return f32_of_bits(sign | (exp + 112) << 23 | man << 13);
}

static inline float of_dt(uint16_t h, int f16) { return f16 ? of_f16(h) : of_bf16(h); }
static inline uint16_t to_dt(float v, int f16) { return f16 ? to_f16(v) : to_bf16(v); }
static inline float rnd(float v, int f16) { return f16 ? of_f16(to_f16(v)) : of_bf16(to_bf16(v)); }

// swiglu is one element of h: transformers' rounding after each step.
static inline float swiglu(float g, float u, int f16) {
	g = rnd(g, f16);
	u = rnd(u, f16);
	float e = (float)exp(-(double)g);
	float act = rnd(g / (1.0f + e), f16);
	return rnd(act * u, f16);
}

// ---- dot products of one weight row with up to 4 vectors ----
//
// dot_fn(row, f16, vecs, n, len, res): res[k] = Σ_c row[c]·vecs[k][c] for
// k < n, float32 accumulation. vecs are float32, except on the bfloat16
// path (bfloat16 vectors).
#define NV 4

// UNROLL unrolls a loop over the NV vectors fully, so that each vector's
// accumulators live in registers: without it GCC 12 kept them in memory
// (each FMA a store and a reload, ~10% of the FMA units' rate at 16 tokens).
#if defined(__clang__)
#define UNROLL _Pragma("unroll")
#else
#define UNROLL _Pragma("GCC unroll 4")
#endif
typedef void (*dot_fn)(const uint16_t *row, int f16, const void *const *vecs, int n, int64_t len, float *res);
// dot2_fn is dot_fn for two rows at once (ra, rb into resa, resb), each
// vector loaded once for both: a gate row and its up row, or two
// neighbouring rows of down. NULL where the ISA has none (two dot calls).
typedef void (*dot2_fn)(const uint16_t *ra, const uint16_t *rb, int f16, const void *const *vecs, int n, int64_t len, float *resa,
                        float *resb);

// The scalar path sums in index order, as the Go reference does.
static void dot_scalar(const uint16_t *row, int f16, const void *const *vecs, int n, int64_t len, float *res) {
	for (int k = 0; k < n; k++) {
		const float *v = (const float *)vecs[k];
		float acc = 0;
		for (int64_t c = 0; c < len; c++) acc += of_dt(row[c], f16) * v[c];
		res[k] = acc;
	}
}

#ifdef CPUFFN_X86
#define T_AVX2 __attribute__((target("avx2,fma,f16c")))
#define T_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define T_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c")))
#define INLINE inline __attribute__((always_inline))

static INLINE T_AVX2 __m256 ld8(const uint16_t *p, const int f16) {
	__m128i v = _mm_loadu_si128((const __m128i *)p);
	if (f16) return _mm256_cvtph_ps(v);
	return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

static INLINE T_AVX2 float hsum8(__m256 v) {
	__m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
	s = _mm_add_ps(s, _mm_movehl_ps(s, s));
	s = _mm_add_ss(s, _mm_movehdup_ps(s));
	return _mm_cvtss_f32(s);
}

static INLINE T_AVX2 void dotn_avx2(const uint16_t *row, const int f16, const void *const *vecs, const int n, int64_t len, float *res) {
	__m256 a0[NV], a1[NV];
	const float *v[NV];
	UNROLL for (int k = 0; k < n; k++) { a0[k] = a1[k] = _mm256_setzero_ps(); v[k] = (const float *)vecs[k]; }
	int64_t c = 0;
	for (; c + 16 <= len; c += 16) {
		__m256 w0 = ld8(row + c, f16), w1 = ld8(row + c + 8, f16);
		UNROLL for (int k = 0; k < n; k++) {
			a0[k] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(v[k] + c), a0[k]);
			a1[k] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(v[k] + c + 8), a1[k]);
		}
	}
	for (; c + 8 <= len; c += 8) {
		__m256 w0 = ld8(row + c, f16);
		UNROLL for (int k = 0; k < n; k++) a0[k] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(v[k] + c), a0[k]);
	}
	UNROLL for (int k = 0; k < n; k++) {
		float s = hsum8(_mm256_add_ps(a0[k], a1[k]));
		for (int64_t cc = c; cc < len; cc++) s += of_dt(row[cc], f16) * v[k][cc];
		res[k] = s;
	}
}

static T_AVX2 void dot_avx2(const uint16_t *row, int f16, const void *const *vecs, int n, int64_t len, float *res) {
#define CASE(F, N) case (F) * 8 + (N): dotn_avx2(row, F, vecs, N, len, res); return;
	switch (f16 * 8 + n) { CASE(0, 1) CASE(0, 2) CASE(0, 3) CASE(0, 4) CASE(1, 1) CASE(1, 2) CASE(1, 3) CASE(1, 4) }
#undef CASE
}

// Two rows, n vectors: one accumulator per (row, vector), 2n of them and
// the two rows' weights in registers (AVX2 has 16). Each vector's load
// serves both rows, which halves what the vectors take from the caches,
// the bound from a few tokens on.
static INLINE T_AVX2 void dot2n_avx2(const uint16_t *ra, const uint16_t *rb, const int f16, const void *const *vecs, const int n,
                                     int64_t len, float *resa, float *resb) {
	__m256 a[NV], b[NV];
	const float *v[NV];
	UNROLL for (int k = 0; k < n; k++) { a[k] = b[k] = _mm256_setzero_ps(); v[k] = (const float *)vecs[k]; }
	int64_t c = 0;
	for (; c + 8 <= len; c += 8) {
		__m256 wa = ld8(ra + c, f16), wb = ld8(rb + c, f16);
		UNROLL for (int k = 0; k < n; k++) {
			__m256 x = _mm256_loadu_ps(v[k] + c);
			a[k] = _mm256_fmadd_ps(wa, x, a[k]);
			b[k] = _mm256_fmadd_ps(wb, x, b[k]);
		}
	}
	UNROLL for (int k = 0; k < n; k++) {
		float sa = hsum8(a[k]), sb = hsum8(b[k]);
		for (int64_t cc = c; cc < len; cc++) {
			sa += of_dt(ra[cc], f16) * v[k][cc];
			sb += of_dt(rb[cc], f16) * v[k][cc];
		}
		resa[k] = sa;
		resb[k] = sb;
	}
}

static T_AVX2 void dot2_avx2(const uint16_t *ra, const uint16_t *rb, int f16, const void *const *vecs, int n, int64_t len, float *resa,
                             float *resb) {
#define CASE(F, N) case (F) * 8 + (N): dot2n_avx2(ra, rb, F, vecs, N, len, resa, resb); return;
	switch (f16 * 8 + n) { CASE(0, 1) CASE(0, 2) CASE(0, 3) CASE(0, 4) CASE(1, 1) CASE(1, 2) CASE(1, 3) CASE(1, 4) }
#undef CASE
}

static INLINE T_AVX512 __m512 ld16(const uint16_t *p, const int f16) {
	__m256i v = _mm256_loadu_si256((const __m256i *)p);
	if (f16) return _mm512_cvtph_ps(v);
	return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

static INLINE T_AVX512 void dotn_avx512(const uint16_t *row, const int f16, const void *const *vecs, const int n, int64_t len, float *res) {
	__m512 a0[NV], a1[NV];
	const float *v[NV];
	UNROLL for (int k = 0; k < n; k++) { a0[k] = a1[k] = _mm512_setzero_ps(); v[k] = (const float *)vecs[k]; }
	int64_t c = 0;
	for (; c + 32 <= len; c += 32) {
		__m512 w0 = ld16(row + c, f16), w1 = ld16(row + c + 16, f16);
		UNROLL for (int k = 0; k < n; k++) {
			a0[k] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(v[k] + c), a0[k]);
			a1[k] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(v[k] + c + 16), a1[k]);
		}
	}
	for (; c + 16 <= len; c += 16) {
		__m512 w0 = ld16(row + c, f16);
		UNROLL for (int k = 0; k < n; k++) a0[k] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(v[k] + c), a0[k]);
	}
	UNROLL for (int k = 0; k < n; k++) {
		float s = _mm512_reduce_add_ps(_mm512_add_ps(a0[k], a1[k]));
		for (int64_t cc = c; cc < len; cc++) s += of_dt(row[cc], f16) * v[k][cc];
		res[k] = s;
	}
}

static T_AVX512 void dot_avx512(const uint16_t *row, int f16, const void *const *vecs, int n, int64_t len, float *res) {
#define CASE(F, N) case (F) * 8 + (N): dotn_avx512(row, F, vecs, N, len, res); return;
	switch (f16 * 8 + n) { CASE(0, 1) CASE(0, 2) CASE(0, 3) CASE(0, 4) CASE(1, 1) CASE(1, 2) CASE(1, 3) CASE(1, 4) }
#undef CASE
}

// The bfloat16 path: bfloat16 rows and vectors, vdpbf16ps (pairs of
// products summed into float32 lanes; denormals flushed).
static INLINE T_BF16 void dotn_bf16(const uint16_t *row, const void *const *vecs, const int n, int64_t len, float *res) {
	__m512 a0[NV], a1[NV];
	const uint16_t *v[NV];
	UNROLL for (int k = 0; k < n; k++) { a0[k] = a1[k] = _mm512_setzero_ps(); v[k] = (const uint16_t *)vecs[k]; }
	int64_t c = 0;
	for (; c + 64 <= len; c += 64) {
		__m512bh w0 = (__m512bh)_mm512_loadu_si512(row + c), w1 = (__m512bh)_mm512_loadu_si512(row + c + 32);
		UNROLL for (int k = 0; k < n; k++) {
			a0[k] = _mm512_dpbf16_ps(a0[k], w0, (__m512bh)_mm512_loadu_si512(v[k] + c));
			a1[k] = _mm512_dpbf16_ps(a1[k], w1, (__m512bh)_mm512_loadu_si512(v[k] + c + 32));
		}
	}
	for (; c + 32 <= len; c += 32) {
		__m512bh w0 = (__m512bh)_mm512_loadu_si512(row + c);
		UNROLL for (int k = 0; k < n; k++) a0[k] = _mm512_dpbf16_ps(a0[k], w0, (__m512bh)_mm512_loadu_si512(v[k] + c));
	}
	UNROLL for (int k = 0; k < n; k++) {
		float s = _mm512_reduce_add_ps(_mm512_add_ps(a0[k], a1[k]));
		for (int64_t cc = c; cc < len; cc++) s += of_bf16(row[cc]) * of_bf16(v[k][cc]);
		res[k] = s;
	}
}

static T_BF16 void dot_bf16(const uint16_t *row, int f16, const void *const *vecs, int n, int64_t len, float *res) {
	(void)f16;
	switch (n) {
	case 1: dotn_bf16(row, vecs, 1, len, res); return;
	case 2: dotn_bf16(row, vecs, 2, len, res); return;
	case 3: dotn_bf16(row, vecs, 3, len, res); return;
	case 4: dotn_bf16(row, vecs, 4, len, res); return;
	}
}
#endif

int cpuffn_supported(int isa) {
	switch (isa) {
	case CPUFFN_SCALAR: return 1;
#ifdef CPUFFN_X86
	case CPUFFN_AVX2:
		__builtin_cpu_init();
		return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
	case CPUFFN_AVX512:
		__builtin_cpu_init();
		return cpuffn_supported(CPUFFN_AVX2) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
	case CPUFFN_AVX512BF16:
		__builtin_cpu_init();
		return cpuffn_supported(CPUFFN_AVX512) && __builtin_cpu_supports("avx512bf16");
#endif
	}
	return 0;
}

// bf16vecs: the job's vectors are bfloat16 (the vdpbf16ps path).
static int bf16vecs(const cpuffn_job *j) { return j->isa == CPUFFN_AVX512BF16 && !j->f16; }

// pick2 is the ISA's two-row dot, NULL where it has none. Only from 2
// vectors on: one vector is bound by memory, and one accumulator per row
// would leave its FMAs waiting on each other.
static dot2_fn pick2(const cpuffn_job *j, int64_t vectors) {
#ifdef CPUFFN_X86
	if (vectors >= 2 && !bf16vecs(j) && j->isa == CPUFFN_AVX2) return dot2_avx2;
#endif
	(void)j;
	(void)vectors;
	return 0;
}

static dot_fn pick(const cpuffn_job *j) {
#ifdef CPUFFN_X86
	if (bf16vecs(j)) return dot_bf16;
	if (j->isa >= CPUFFN_AVX512) return dot_avx512;
	if (j->isa == CPUFFN_AVX2) return dot_avx2;
#endif
	return dot_scalar;
}

void cpuffn_prepare(const cpuffn_job *j) {
	const uint16_t *x = (const uint16_t *)(uintptr_t)j->x;
	float *xf = (float *)(uintptr_t)j->xf;
	for (int64_t c = 0; c < j->T * j->H; c++) xf[c] = of_dt(x[c], (int)j->f16);
}

static void gateup_rows(const cpuffn_job *j, int64_t i0, int64_t i1) {
	const int f16 = (int)j->f16, bvec = bf16vecs(j);
	const int64_t H = j->H, I = j->I, K = j->K;
	const int32_t *order = (const int32_t *)(uintptr_t)j->order;
	const int64_t *gstart = (const int64_t *)(uintptr_t)j->gstart;
	const uint64_t *ggate = (const uint64_t *)(uintptr_t)j->ggate, *gup = (const uint64_t *)(uintptr_t)j->gup;
	float *h = (float *)(uintptr_t)j->h;
	uint16_t *hb = (uint16_t *)(uintptr_t)j->hb;
	const float *xf = (const float *)(uintptr_t)j->xf;
	const uint16_t *x = (const uint16_t *)(uintptr_t)j->x;
	dot_fn dot = pick(j);
	for (int64_t g = 0; g < j->G; g++) {
		const uint16_t *wg = (const uint16_t *)(uintptr_t)ggate[g], *wu = (const uint16_t *)(uintptr_t)gup[g];
		dot2_fn dot2 = pick2(j, gstart[g + 1] - gstart[g]);
		for (int64_t i = i0; i < i1; i++) {
			for (int64_t q = gstart[g]; q < gstart[g + 1]; q += NV) {
				int n = (int)(gstart[g + 1] - q < NV ? gstart[g + 1] - q : NV);
				const void *vecs[NV];
				for (int k = 0; k < n; k++) {
					int64_t t = order[q + k] / K;
					vecs[k] = bvec ? (const void *)(x + t * H) : (const void *)(xf + t * H);
				}
				float gs[NV], us[NV];
				if (dot2) {
					dot2(wg + i * H, wu + i * H, f16, vecs, n, H, gs, us);
				} else {
					dot(wg + i * H, f16, vecs, n, H, gs);
					dot(wu + i * H, f16, vecs, n, H, us);
				}
				for (int k = 0; k < n; k++) {
					int64_t p = order[q + k];
					float v = swiglu(gs[k], us[k], f16);
					h[p * I + i] = v;
					if (bvec) hb[p * I + i] = to_bf16(v); // exact: v is a bfloat16 value
				}
			}
		}
	}
}

static void down_rows(const cpuffn_job *j, int64_t r0, int64_t r1, int64_t worker) {
	const int f16 = (int)j->f16, bvec = bf16vecs(j);
	const int64_t H = j->H, I = j->I, K = j->K, P = j->P;
	const int32_t *order = (const int32_t *)(uintptr_t)j->order;
	const int64_t *gstart = (const int64_t *)(uintptr_t)j->gstart;
	const uint64_t *gdown = (const uint64_t *)(uintptr_t)j->gdown;
	const float *h = (const float *)(uintptr_t)j->h, *wts = (const float *)(uintptr_t)j->wts;
	const uint16_t *hb = (const uint16_t *)(uintptr_t)j->hb;
	const uint8_t *valid = (const uint8_t *)(uintptr_t)j->valid;
	uint16_t *out = (uint16_t *)(uintptr_t)j->out;
	const float *addend = (const float *)(uintptr_t)j->addend;
	float *partial = (float *)(uintptr_t)j->partial;
	float *y = (float *)(uintptr_t)j->y + worker * P * CPUFFN_RB;
	dot_fn dot = pick(j);
	for (int64_t rb = r0; rb < r1; rb += CPUFFN_RB) {
		int64_t nb = r1 - rb < CPUFFN_RB ? r1 - rb : CPUFFN_RB;
		for (int64_t g = 0; g < j->G; g++) {
			const uint16_t *wd = (const uint16_t *)(uintptr_t)gdown[g];
			dot2_fn dot2 = pick2(j, gstart[g + 1] - gstart[g]);
			for (int64_t rr = 0; rr < nb;) {
				const int two = dot2 && rr + 1 < nb; // rows rr and rr + 1 together
				for (int64_t q = gstart[g]; q < gstart[g + 1]; q += NV) {
					int n = (int)(gstart[g + 1] - q < NV ? gstart[g + 1] - q : NV);
					const void *vecs[NV];
					for (int k = 0; k < n; k++) {
						int64_t p = order[q + k];
						vecs[k] = bvec ? (const void *)(hb + p * I) : (const void *)(h + p * I);
					}
					float ys[NV], ys2[NV];
					if (two)
						dot2(wd + (rb + rr) * I, wd + (rb + rr + 1) * I, f16, vecs, n, I, ys, ys2);
					else
						dot(wd + (rb + rr) * I, f16, vecs, n, I, ys);
					for (int k = 0; k < n; k++) {
						y[order[q + k] * CPUFFN_RB + rr] = rnd(ys[k], f16);
						if (two) y[order[q + k] * CPUFFN_RB + rr + 1] = rnd(ys2[k], f16);
					}
				}
				rr += 1 + two;
			}
		}
		// The weighted sum over a token's experts, in the reference's order
		// (a token without valid pairs sums to 0 plus its addend).
		for (int64_t t = 0; t < j->T; t++) {
			for (int64_t rr = 0; rr < nb; rr++) {
				float acc = 0;
				for (int64_t k = 0; k < K; k++) {
					int64_t p = t * K + k;
					if (valid[p]) acc += wts[p] * y[p * CPUFFN_RB + rr];
				}
				// The addend joins after the token's own pairs, as in the reference.
				if (addend) acc += addend[t * H + rb + rr];
				if (partial) partial[t * H + rb + rr] = acc;
				else out[t * H + rb + rr] = to_dt(acc, f16);
			}
		}
	}
}

void cpuffn_gateup(cpuffn_job *j) {
	for (;;) {
		int64_t lo = __atomic_fetch_add(&j->next, j->chunk, __ATOMIC_RELAXED);
		if (lo >= j->I) return;
		gateup_rows(j, lo, lo + j->chunk < j->I ? lo + j->chunk : j->I);
	}
}

void cpuffn_down(cpuffn_job *j, int64_t worker) {
	for (;;) {
		int64_t lo = __atomic_fetch_add(&j->next, j->chunk, __ATOMIC_RELAXED);
		if (lo >= j->H) return;
		down_rows(j, lo, lo + j->chunk < j->H ? lo + j->chunk : j->H, worker);
	}
}

// ---- the read-bandwidth probe ----

static double sum_scalar(const uint8_t *b, int64_t n) {
	uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0, w[4];
	int64_t c = 0;
	for (; c + 32 <= n; c += 32) {
		memcpy(w, b + c, 32);
		s0 += w[0]; s1 += w[1]; s2 += w[2]; s3 += w[3];
	}
	for (; c < n; c++) s0 += b[c];
	return (double)(s0 + s1 + s2 + s3);
}

#ifdef CPUFFN_X86
static T_AVX2 double sum_avx2(const uint8_t *b, int64_t n) {
	__m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
	int64_t c = 0;
	for (; c + 128 <= n; c += 128) {
		a0 = _mm256_add_epi64(a0, _mm256_loadu_si256((const __m256i *)(b + c)));
		a1 = _mm256_add_epi64(a1, _mm256_loadu_si256((const __m256i *)(b + c + 32)));
		a2 = _mm256_add_epi64(a2, _mm256_loadu_si256((const __m256i *)(b + c + 64)));
		a3 = _mm256_add_epi64(a3, _mm256_loadu_si256((const __m256i *)(b + c + 96)));
	}
	uint64_t w[4];
	_mm256_storeu_si256((__m256i *)w, _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3)));
	return (double)(w[0] + w[1] + w[2] + w[3]) + sum_scalar(b + c, n - c);
}

static T_AVX512 double sum_avx512(const uint8_t *b, int64_t n) {
	__m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
	int64_t c = 0;
	for (; c + 256 <= n; c += 256) {
		a0 = _mm512_add_epi64(a0, _mm512_loadu_si512(b + c));
		a1 = _mm512_add_epi64(a1, _mm512_loadu_si512(b + c + 64));
		a2 = _mm512_add_epi64(a2, _mm512_loadu_si512(b + c + 128));
		a3 = _mm512_add_epi64(a3, _mm512_loadu_si512(b + c + 192));
	}
	uint64_t s = _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3)));
	return (double)s + sum_scalar(b + c, n - c);
}
#endif

double cpuffn_sum(uint64_t buf, int64_t nbytes, int isa) {
	const uint8_t *b = (const uint8_t *)(uintptr_t)buf;
#ifdef CPUFFN_X86
	if (isa >= CPUFFN_AVX512) return sum_avx512(b, nbytes);
	if (isa == CPUFFN_AVX2) return sum_avx2(b, nbytes);
#endif
	(void)isa;
	return sum_scalar(b, nbytes);
}
