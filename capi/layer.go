package main

/*
#include <stdint.h>
#define MOE_INFINITY_TYPES_ONLY
#include "moe_infinity.h"
*/
import "C"

import (
	"fmt"
	"unsafe"

	"github.com/moe-infinity/moe_infinity/go/engine"
)

// The MOE_PATH_* and MOE_LAYER_* values of moe_infinity.h are the engine's
// (abi_test.go checks).
var (
	pathDefines = map[string]engine.Path{
		"MOE_PATH_MAPPED": engine.PathMapped, "MOE_PATH_KERNELS": engine.PathKernels,
		"MOE_PATH_HOST_STREAM": engine.PathHostStream, "MOE_PATH_HOST_STACKED": engine.PathHostStacked,
		"MOE_PATH_NEED_ROUTING": engine.PathNeedRouting,
	}
	flagDefines = map[string]engine.LayerFlags{
		"MOE_LAYER_NO_MAPPED": engine.LayerNoMapped, "MOE_LAYER_NO_KERNELS": engine.LayerNoKernels,
		"MOE_LAYER_HOST_BATCHED": engine.LayerHostBatched, "MOE_LAYER_ROUTING_GAPS": engine.LayerRoutingGaps,
		"MOE_LAYER_ROWWISE": engine.LayerRowwise,
	}
	allFlags = engine.LayerNoMapped | engine.LayerNoKernels | engine.LayerHostBatched | engine.LayerRoutingGaps | engine.LayerRowwise
)

//export moe_layer
func moe_layer(handle C.uint64_t, args *C.moe_layer_args) C.int32_t {
	return withEngine(handle, func(e *engine.Engine) error {
		if args == nil {
			return fmt.Errorf("%w: args must not be NULL", engine.ErrInvalid)
		}
		a := args
		a.path, a.n_experts, a.n_cpu_experts = 0, 0, 0
		switch {
		case a.nreq < 0 || a.nreq > 1<<20 || a.tokens <= 0 || a.tokens > 1<<24 || a.k <= 0 || a.k > 1<<10:
			return fmt.Errorf("%w: nreq %d, tokens %d, k %d out of range", engine.ErrInvalid, a.nreq, a.tokens, a.k)
		case a.nreq > 0 && a.reqs == nil:
			return fmt.Errorf("%w: reqs must not be NULL", engine.ErrInvalid)
		case engine.LayerFlags(a.flags)&^allFlags != 0:
			return fmt.Errorf("%w: unknown flags %#x (MOE_LAYER_*)", engine.ErrInvalid, uint32(a.flags))
		case a.experts_cap < 0 || (a.experts_cap > 0 && a.experts == nil):
			return fmt.Errorf("%w: experts_cap %d with experts %p", engine.ErrInvalid, a.experts_cap, a.experts)
		case a.partial != 0 && a.experts_cap > 0 && a.cpu_experts == nil:
			return fmt.Errorf("%w: partial offered without cpu_experts", engine.ErrInvalid)
		}
		dt, err := engine.ActivationDType(int32(a.dtype))
		if err != nil {
			return err
		}
		wdt, err := engine.RoutingWeightsDType(int32(a.weights_dtype))
		if err != nil {
			return err
		}
		la := engine.LayerArgs{
			FFNCall: engine.FFNCall{
				Layer: int(a.layer), Stream: uintptr(a.stream),
				X: uint64(a.x), Out: uint64(a.out), Scratch: uint64(a.scratch), TopK: uint64(a.topk), Weights: uint64(a.weights),
				T: int64(a.tokens), K: int64(a.k), DType: dt, WDType: wdt,
			},
			Flags: engine.LayerFlags(a.flags), Partial: uint64(a.partial),
		}
		if a.nreq > 0 {
			la.Reqs = append([]uint64(nil), unsafe.Slice((*uint64)(unsafe.Pointer(a.reqs)), int(a.nreq))...)
		}
		if a.topk_host != nil {
			la.TopKHost = unsafe.Slice((*int64)(unsafe.Pointer(a.topk_host)), int(a.tokens*a.k))
		}
		r, err := e.Layer(la)
		if err != nil {
			return err
		}
		if n := max(len(r.Experts), len(r.CPUExperts)); n > int(a.experts_cap) {
			return fmt.Errorf("%w: the layer needs %d experts but experts_cap is %d", engine.ErrInvalid, n, a.experts_cap)
		}
		if len(r.Experts) > 0 {
			copy(unsafe.Slice((*int32)(unsafe.Pointer(a.experts)), int(a.experts_cap)), r.Experts)
		}
		if len(r.CPUExperts) > 0 {
			copy(unsafe.Slice((*int32)(unsafe.Pointer(a.cpu_experts)), int(a.experts_cap)), r.CPUExperts)
		}
		a.path, a.n_experts, a.n_cpu_experts = C.int32_t(r.Path), C.int32_t(len(r.Experts)), C.int32_t(len(r.CPUExperts))
		return nil
	})
}
