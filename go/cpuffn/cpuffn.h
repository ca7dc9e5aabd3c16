// Expert FFN kernels of the CPU backend (see cpuffn.go). Every address is
// a host address carried as an integer, so that the job (written by Go
// into C memory) holds no Go pointers.
#ifndef MOE_CPUFFN_H
#define MOE_CPUFFN_H
#include <stdint.h>

// Instruction sets, best last; cpuffn_best_isa picks at run time.
enum { CPUFFN_SCALAR = 0, CPUFFN_AVX2 = 1, CPUFFN_AVX512 = 2, CPUFFN_AVX512BF16 = 3 };

// Row block of the down projection: each worker computes this many output
// rows for every pair before combining them per token.
#define CPUFFN_RB 8

typedef struct {
	int64_t T, K, H, I, P, G; // tokens, experts per token, hidden, inter, pairs, experts used
	int64_t f16;              // 1: float16 activations and weights; 0: bfloat16
	int64_t isa;              // CPUFFN_*
	uint64_t x;               // [T, H] activations (f16 ? float16 : bfloat16)
	uint64_t xf;              // [T, H] float32: x converted (cpuffn_prepare)
	uint64_t out;             // [T, H] output, x's type (unused when partial is set)
	uint64_t addend;          // [T, H] float32 added to each token's sum before it is stored; 0: none
	uint64_t partial;         // [T, H] float32: when set, receives the sums unrounded instead of out
	uint64_t h;               // [P, I] float32 SwiGLU intermediate
	uint64_t hb;              // [P, I] bfloat16 copy of h (CPUFFN_AVX512BF16 with bfloat16)
	uint64_t wts;             // [P] float32 routing weights
	uint64_t valid;           // [P] uint8: 0 = the pair contributes nothing
	uint64_t order;           // [P] int32: valid pairs, grouped by expert
	uint64_t gstart;          // [G + 1] int64: group g is order[gstart[g]:gstart[g+1]]
	uint64_t ggate, gup, gdown; // [G] uint64: each group's gate [I, H], up [I, H], down [H, I] rows
	uint64_t y;               // [workers][P * CPUFFN_RB] float32 down-projection scratch
	int64_t next;             // the next row a worker of the running phase takes (atomic)
	int64_t chunk;            // rows a worker takes at a time (a multiple of CPUFFN_RB)
} cpuffn_job;

int cpuffn_supported(int isa);
void cpuffn_prepare(const cpuffn_job *j);
// The two phases. Each worker of a phase makes one call, which takes
// chunks of rows (j->chunk at a time, from j->next, which the caller sets
// to 0 before the phase) until none are left: a worker slowed down by a
// busy core takes fewer rows instead of holding the others up.
void cpuffn_gateup(cpuffn_job *j);
void cpuffn_down(cpuffn_job *j, int64_t worker);
double cpuffn_sum(uint64_t buf, int64_t nbytes, int isa);

#endif
