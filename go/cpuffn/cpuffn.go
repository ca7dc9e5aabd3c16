//go:build cgo

package cpuffn

/*
#cgo CFLAGS: -O2
#cgo LDFLAGS: -lm
#include <stdlib.h>
#include "cpuffn.h"
*/
import "C"

import (
	"fmt"
	"runtime"
	"sort"
	"sync"
	"unsafe"
)

// ISA is an instruction set the kernels are compiled for.
type ISA int

// The instruction sets, best last.
const (
	// Scalar is portable C (every machine).
	Scalar ISA = C.CPUFFN_SCALAR
	// AVX2 is AVX2 with FMA and F16C (x86-64).
	AVX2 ISA = C.CPUFFN_AVX2
	// AVX512 is AVX-512 F/BW/VL.
	AVX512 ISA = C.CPUFFN_AVX512
	// AVX512BF16 adds vdpbf16ps for bfloat16 experts (float16 experts run
	// the AVX512 code).
	AVX512BF16 ISA = C.CPUFFN_AVX512BF16
)

// ISAs lists every instruction set, best last.
var ISAs = []ISA{Scalar, AVX2, AVX512, AVX512BF16}

// String names the instruction set.
func (i ISA) String() string {
	switch i {
	case Scalar:
		return "scalar"
	case AVX2:
		return "avx2"
	case AVX512:
		return "avx512"
	case AVX512BF16:
		return "avx512bf16"
	}
	return fmt.Sprintf("ISA(%d)", int(i))
}

// Supported reports whether this CPU runs i.
func Supported(i ISA) bool { return C.cpuffn_supported(C.int(i)) != 0 }

// Best is the best instruction set this CPU runs.
func Best() ISA {
	best := Scalar
	for _, i := range ISAs {
		if Supported(i) {
			best = i
		}
	}
	return best
}

// Problem is one expert-FFN computation over T tokens with K experts each
// (P = T·K pairs p = t·K + j). Addresses are host addresses.
type Problem struct {
	T, K, Hidden, Inter int64
	// F16: activations and expert weights are float16; otherwise bfloat16.
	F16 bool
	// X is [T, Hidden] activations; Out receives [T, Hidden], same type.
	X, Out uint64
	// Addend, when set, is [T, Hidden] float32 added to each token's
	// weighted sum after its pairs (in index order) and before the sum is
	// stored: the device's part of a layer added to the CPU's, or the
	// CPU's added to the device's (backend.FFNArgs.Addend).
	Addend uint64
	// PartialOut, when set, receives the [T, Hidden] float32 sums
	// unrounded (Addend included) instead of Out, which may then be 0: the
	// CPU's part of a layer handed to the device's kernels as their
	// Addend.
	PartialOut uint64
	// Scratch is [P, Inter] float32 and receives the SwiGLU intermediate h.
	Scratch uint64
	// Weights are the P routing weights.
	Weights []float32
	// Gate, Up and Down are, per pair, the addresses of its expert's gate
	// rows [Inter, Hidden], up rows [Inter, Hidden] and down rows [Hidden,
	// Inter]; a pair whose Gate is 0 contributes nothing (its h is 0).
	// Pairs with equal Gate addresses share one expert.
	Gate, Up, Down []uint64
}

func (p Problem) check() error {
	P := p.T * p.K
	switch {
	case p.T <= 0 || p.K <= 0 || p.Hidden <= 0 || p.Inter <= 0:
		return fmt.Errorf("cpuffn: shape T=%d K=%d hidden=%d inter=%d must be positive", p.T, p.K, p.Hidden, p.Inter)
	case int64(len(p.Weights)) != P || int64(len(p.Gate)) != P || int64(len(p.Up)) != P || int64(len(p.Down)) != P:
		return fmt.Errorf("cpuffn: %d pairs need %d weights and expert addresses (got %d, %d, %d, %d)", P, P, len(p.Weights), len(p.Gate), len(p.Up), len(p.Down))
	case p.X == 0 || (p.Out == 0 && p.PartialOut == 0) || p.Scratch == 0:
		return fmt.Errorf("cpuffn: a tensor address is null")
	}
	for i, g := range p.Gate {
		if g != 0 && (p.Up[i] == 0 || p.Down[i] == 0) {
			return fmt.Errorf("cpuffn: pair %d has gate rows but no up or down rows", i)
		}
	}
	return nil
}

// Kernel runs Problems on a number of threads (SetThreads changes it)
// with one instruction set. Its workspace (C memory, reused across calls) is guarded by a
// mutex: calls on one Kernel run one at a time.
type Kernel struct {
	threads int
	isa     ISA

	mu      sync.Mutex
	ws      unsafe.Pointer
	wsBytes uintptr
	job     *C.cpuffn_job
}

// New returns a Kernel on threads threads (<= 0: runtime.NumCPU()) with
// the best instruction set of this CPU.
func New(threads int) *Kernel {
	k, _ := NewISA(threads, Best())
	return k
}

// NewISA returns a Kernel that runs isa, or an error if this CPU lacks it.
func NewISA(threads int, isa ISA) (*Kernel, error) {
	if !Supported(isa) {
		return nil, fmt.Errorf("cpuffn: this CPU does not run %s", isa)
	}
	if threads <= 0 {
		threads = runtime.NumCPU()
	}
	return &Kernel{threads: threads, isa: isa}, nil
}

// Threads is the number of threads a call splits its rows over.
func (k *Kernel) Threads() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.threads
}

// SetThreads sets the number of threads later calls split their rows over
// (<= 0: runtime.NumCPU()); a call running now keeps its count.
func (k *Kernel) SetThreads(threads int) {
	if threads <= 0 {
		threads = runtime.NumCPU()
	}
	k.mu.Lock()
	k.threads = threads
	k.mu.Unlock()
}

// ISA is the instruction set the Kernel runs.
func (k *Kernel) ISA() ISA { return k.isa }

// Close frees the workspace; the Kernel stays usable (a later call
// allocates a new one).
func (k *Kernel) Close() {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.ws != nil {
		C.free(k.ws)
		k.ws, k.wsBytes, k.job = nil, 0, nil
	}
}

// workspace returns n bytes of C memory (k.mu held).
func (k *Kernel) workspace(n uintptr) unsafe.Pointer {
	if n > k.wsBytes {
		if k.ws != nil {
			C.free(k.ws)
		}
		n = max(n, 2*k.wsBytes)
		k.ws = C.malloc(C.size_t(n))
		if k.ws == nil {
			panic("cpuffn: out of memory")
		}
		k.wsBytes = n
	}
	return k.ws
}

// carve hands out aligned pieces of a workspace.
type carve struct {
	base unsafe.Pointer
	off  uintptr
}

func (c *carve) take(n uintptr) unsafe.Pointer {
	c.off = (c.off + 63) &^ 63
	at := unsafe.Add(c.base, c.off)
	c.off += n
	return at
}

// addr is p as a job field.
func addr(p unsafe.Pointer) C.uint64_t { return C.uint64_t(uintptr(p)) }

// ptrOf turns a caller's host address into a pointer.
func ptrOf(a uint64) unsafe.Pointer { return *(*unsafe.Pointer)(unsafe.Pointer(&a)) }

// Run computes p.
func (k *Kernel) Run(p Problem) error {
	if err := p.check(); err != nil {
		return err
	}
	P := p.T * p.K
	// Group the valid pairs by expert (Gate address), in first-use order.
	order := make([]int32, 0, P)
	for i := range p.Gate {
		if p.Gate[i] != 0 {
			order = append(order, int32(i))
		}
	}
	sort.SliceStable(order, func(a, b int) bool { return p.Gate[order[a]] < p.Gate[order[b]] })
	var starts []int64
	for q := range order {
		if q == 0 || p.Gate[order[q]] != p.Gate[order[q-1]] {
			starts = append(starts, int64(q))
		}
	}
	G := int64(len(starts))
	starts = append(starts, int64(len(order)))

	k.mu.Lock()
	defer k.mu.Unlock()
	bf16 := k.isa == AVX512BF16 && !p.F16
	sizes := []uintptr{
		unsafe.Sizeof(C.cpuffn_job{}),
		uintptr(p.T*p.Hidden) * 4, // xf
		uintptr(P) * 4,            // wts
		uintptr(P),                // valid
		uintptr(P) * 4,            // order
		uintptr(G+1) * 8,          // gstart
		uintptr(G) * 8 * 3,        // ggate, gup, gdown
		uintptr(k.threads) * uintptr(P) * C.CPUFFN_RB * 4, // y
	}
	if bf16 {
		sizes = append(sizes, uintptr(P*p.Inter)*2) // hb
	}
	var total uintptr
	for _, s := range sizes {
		total += s + 64
	}
	cv := carve{base: k.workspace(total)}
	j := (*C.cpuffn_job)(cv.take(sizes[0]))
	*j = C.cpuffn_job{
		T: C.int64_t(p.T), K: C.int64_t(p.K), H: C.int64_t(p.Hidden), I: C.int64_t(p.Inter),
		P: C.int64_t(P), G: C.int64_t(G), isa: C.int64_t(k.isa),
		x: C.uint64_t(p.X), out: C.uint64_t(p.Out), h: C.uint64_t(p.Scratch),
		addend: C.uint64_t(p.Addend), partial: C.uint64_t(p.PartialOut),
	}
	if p.F16 {
		j.f16 = 1
	}
	wts, valid, ord, gstart := cv.take(sizes[2]), cv.take(sizes[3]), cv.take(sizes[4]), cv.take(sizes[5])
	gtab := cv.take(sizes[6])
	j.xf, j.wts, j.valid, j.order, j.gstart = addr(cv.take(sizes[1])), addr(wts), addr(valid), addr(ord), addr(gstart)
	j.ggate, j.gup, j.gdown = addr(gtab), addr(unsafe.Add(gtab, G*8)), addr(unsafe.Add(gtab, 2*G*8))
	j.y = addr(cv.take(sizes[7]))
	if bf16 {
		j.hb = addr(cv.take(sizes[8]))
	}

	copy(view[float32](wts, P), p.Weights)
	vs := view[uint8](valid, P)
	for i := range vs {
		vs[i] = 0
		if p.Gate[i] != 0 {
			vs[i] = 1
		}
	}
	copy(view[int32](ord, int64(len(order))), order)
	copy(view[int64](gstart, G+1), starts)
	gg, gu, gd := view[uint64](gtab, G), view[uint64](unsafe.Add(gtab, G*8), G), view[uint64](unsafe.Add(gtab, 2*G*8), G)
	for g := int64(0); g < G; g++ {
		q := order[starts[g]]
		gg[g], gu[g], gd[g] = p.Gate[q], p.Up[q], p.Down[q]
	}
	// Pairs that contribute nothing have h = 0, as in the reference.
	h := view[float32](ptrOf(p.Scratch), P*p.Inter)
	for i, g := range p.Gate {
		if g == 0 {
			clear(h[int64(i)*p.Inter : int64(i+1)*p.Inter])
		}
	}

	if !bf16 {
		C.cpuffn_prepare(j)
	}
	k.phase(j, p.Inter, func(w int) { C.cpuffn_gateup(j) })
	k.phase(j, p.Hidden, func(w int) { C.cpuffn_down(j, C.int64_t(w)) })
	return nil
}

// phase runs one phase over n rows: min(threads, chunks) workers, one
// goroutine (one cgo call) each, the caller's goroutine being the last,
// take chunks of rows from the job's counter until none are left. Chunks
// are about an eighth of a worker's even share, whole CPUFFN_RB blocks.
func (k *Kernel) phase(j *C.cpuffn_job, n int64, f func(worker int)) {
	const rb = C.CPUFFN_RB
	chunk := max((n/int64(8*k.threads)+rb-1)/rb*rb, rb)
	j.next, j.chunk = 0, C.int64_t(chunk)
	workers := int(min(int64(k.threads), (n+chunk-1)/chunk))
	var wg sync.WaitGroup
	for w := range workers - 1 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			f(w)
		}()
	}
	f(workers - 1)
	wg.Wait()
}

// view is n elements of T at ptr (C memory or caller memory).
func view[T any](ptr unsafe.Pointer, n int64) []T {
	if n == 0 {
		return nil
	}
	return unsafe.Slice((*T)(ptr), n)
}
