// Command capi is the C ABI of the moe_infinity engine, built with
// -buildmode=c-shared into libmoe_infinity.so. It is the only package with
// //export declarations: each export checks its arguments, calls the
// engine, maps the error to a status code and recovers panics.
package main

/*
#include <stdint.h>
#include <stdlib.h>
*/
import "C"

import (
	"encoding/json"
	"fmt"
	"os"
	"runtime"
	"unsafe"

	godtype "github.com/moe-infinity/moe_infinity/go/dtype"
	"github.com/moe-infinity/moe_infinity/go/engine"
)

func main() {}

// writeOut copies s (plus a NUL) into the caller's buffer.
func writeOut(s []byte, buf *C.char, capacity C.int64_t, needed *C.int64_t) error {
	if needed != nil {
		*needed = C.int64_t(len(s))
	}
	if buf == nil || int64(capacity) <= int64(len(s)) {
		return fmt.Errorf("%w: %d bytes needed, buffer holds %d", engine.ErrBuffer, len(s)+1, int64(capacity))
	}
	dst := unsafe.Slice((*byte)(unsafe.Pointer(buf)), int(capacity))
	copy(dst, s)
	dst[len(s)] = 0
	return nil
}

func writeJSON(v any, buf *C.char, capacity C.int64_t, needed *C.int64_t) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encoding result: %w", err)
	}
	return writeOut(b, buf, capacity, needed)
}

func nonNil(name string, p unsafe.Pointer) error {
	if p == nil {
		return fmt.Errorf("%w: %s is NULL", engine.ErrInvalid, name)
	}
	return nil
}

//export moe_version
func moe_version(buf *C.char, capacity C.int64_t, needed *C.int64_t) C.int32_t {
	return guard(func() error {
		return writeOut([]byte(engine.Version+" ("+buildVariant+")"), buf, capacity, needed)
	})
}

//export moe_last_error
func moe_last_error(buf *C.char, capacity C.int64_t, needed *C.int64_t) C.int32_t {
	// Not guard(): reading the last error must not overwrite it.
	return C.int32_t(engine.Code(writeOut([]byte(lastError()), buf, capacity, needed)))
}

//export moe_engine_create
func moe_engine_create(config *C.char, handle *C.uint64_t) C.int32_t {
	return guard(func() error {
		if err := nonNil("config_json", unsafe.Pointer(config)); err != nil {
			return err
		}
		if err := nonNil("handle", unsafe.Pointer(handle)); err != nil {
			return err
		}
		cfg, err := engine.ParseConfig([]byte(C.GoString(config)))
		if err != nil {
			return err
		}
		e, err := engine.New(cfg)
		if err != nil {
			return err
		}
		*handle = C.uint64_t(register(e))
		return nil
	})
}

//export moe_engine_close
func moe_engine_close(handle C.uint64_t) C.int32_t {
	return guard(func() error {
		e, err := lookup(uint64(handle))
		if err != nil {
			return err
		}
		err = e.Close()
		if e.Leases() == 0 {
			_, _ = unregister(uint64(handle))
		}
		return err
	})
}

// guard runs f, records its error as the thread's last error and returns
// the status; a panic in f becomes MOE_ERR_INTERNAL instead of crossing
// into C.
func guard(f func() error) (st C.int32_t) {
	defer func() {
		if r := recover(); r != nil {
			st = C.int32_t(recovered(r))
		}
	}()
	return C.int32_t(finish(f()))
}

// withEngine runs f on the engine of handle under guard.
func withEngine(handle C.uint64_t, f func(e *engine.Engine) error) C.int32_t {
	return guard(func() error {
		e, err := lookup(uint64(handle))
		if err != nil {
			return err
		}
		return f(e)
	})
}

//export moe_engine_add_checkpoint
func moe_engine_add_checkpoint(handle C.uint64_t, path *C.char) C.int32_t {
	return withEngine(handle, func(e *engine.Engine) error {
		if err := nonNil("path", unsafe.Pointer(path)); err != nil {
			return err
		}
		return e.AddCheckpoint(C.GoString(path))
	})
}

//export moe_engine_add_compressed
func moe_engine_add_compressed(handle C.uint64_t, request *C.char, buf *C.char, capacity C.int64_t, needed *C.int64_t) C.int32_t {
	return withEngine(handle, func(e *engine.Engine) error {
		if err := nonNil("request_json", unsafe.Pointer(request)); err != nil {
			return err
		}
		req, err := engine.ParseCompressRequest([]byte(C.GoString(request)))
		if err != nil {
			return err
		}
		res, err := e.AddCompressed(req)
		if err != nil {
			return err
		}
		return writeJSON(res, buf, capacity, needed)
	})
}

//export moe_engine_compress_host
func moe_engine_compress_host(handle C.uint64_t, request *C.char, buf *C.char, capacity C.int64_t, needed *C.int64_t) C.int32_t {
	return withEngine(handle, func(e *engine.Engine) error {
		if err := nonNil("request_json", unsafe.Pointer(request)); err != nil {
			return err
		}
		req, err := engine.ParseHostCompressRequest([]byte(C.GoString(request)))
		if err != nil {
			return err
		}
		res, err := e.CompressHost(req)
		if err != nil {
			return err
		}
		return writeJSON(res, buf, capacity, needed)
	})
}

//export moe_engine_add_host_tensor
func moe_engine_add_host_tensor(handle C.uint64_t, name *C.char, dtype *C.char, ndim C.int32_t,
	shape *C.int64_t, data unsafe.Pointer, nbytes C.int64_t) C.int32_t {
	return withEngine(handle, func(e *engine.Engine) error {
		for _, a := range []struct {
			n string
			p unsafe.Pointer
		}{{"name", unsafe.Pointer(name)}, {"dtype", unsafe.Pointer(dtype)}} {
			if err := nonNil(a.n, a.p); err != nil {
				return err
			}
		}
		if ndim < 0 || ndim > 8 {
			return fmt.Errorf("%w: ndim %d out of range [0, 8]", engine.ErrInvalid, ndim)
		}
		if ndim > 0 {
			if err := nonNil("shape", unsafe.Pointer(shape)); err != nil {
				return err
			}
		}
		if nbytes < 0 || (nbytes > 0 && data == nil) {
			return fmt.Errorf("%w: data is NULL or nbytes (%d) negative", engine.ErrInvalid, nbytes)
		}
		dims := make([]int64, int(ndim))
		if ndim > 0 {
			copy(dims, unsafe.Slice((*int64)(unsafe.Pointer(shape)), int(ndim)))
		}
		var b []byte
		if nbytes > 0 {
			b = unsafe.Slice((*byte)(data), int(nbytes))
		}
		return e.AddHostTensor(C.GoString(name), C.GoString(dtype), dims, b)
	})
}

//export moe_engine_modules
func moe_engine_modules(handle C.uint64_t, buf *C.char, capacity C.int64_t, needed *C.int64_t) C.int32_t {
	return withEngine(handle, func(e *engine.Engine) error {
		mods, err := e.Modules()
		if err != nil {
			return err
		}
		return writeJSON(mods, buf, capacity, needed)
	})
}

//export moe_engine_configure
func moe_engine_configure(handle C.uint64_t, setup *C.char, buf *C.char, capacity C.int64_t, needed *C.int64_t) C.int32_t {
	return withEngine(handle, func(e *engine.Engine) error {
		if err := nonNil("setup_json", unsafe.Pointer(setup)); err != nil {
			return err
		}
		// A retry after MOE_ERR_BUFFER must not configure twice.
		if plan, err := e.Plan(); err == nil {
			return writeJSON(plan, buf, capacity, needed)
		}
		su, err := engine.ParseSetup([]byte(C.GoString(setup)))
		if err != nil {
			return err
		}
		plan, err := e.Configure(su)
		if err != nil {
			return err
		}
		return writeJSON(plan, buf, capacity, needed)
	})
}

//export moe_engine_slot_plan
func moe_engine_slot_plan(handle C.uint64_t, setup *C.char, buf *C.char, capacity C.int64_t, needed *C.int64_t) C.int32_t {
	return withEngine(handle, func(e *engine.Engine) error {
		if err := nonNil("setup_json", unsafe.Pointer(setup)); err != nil {
			return err
		}
		su, err := engine.ParseSetup([]byte(C.GoString(setup)))
		if err != nil {
			return err
		}
		p, err := e.SlotPlan(su)
		if err != nil {
			return err
		}
		return writeJSON(p, buf, capacity, needed)
	})
}

//export moe_engine_arena
func moe_engine_arena(handle C.uint64_t, addr *C.uint64_t, nbytes *C.int64_t) C.int32_t {
	return withEngine(handle, func(e *engine.Engine) error {
		if addr == nil || nbytes == nil {
			return fmt.Errorf("%w: addr and bytes must not be NULL", engine.ErrInvalid)
		}
		a, n, err := e.Arena()
		if err != nil {
			return err
		}
		*addr, *nbytes = C.uint64_t(a), C.int64_t(n)
		return nil
	})
}

//export moe_engine_slot_addr
func moe_engine_slot_addr(handle C.uint64_t, slot C.int32_t, addr *C.uint64_t) C.int32_t {
	return withEngine(handle, func(e *engine.Engine) error {
		if err := nonNil("addr", unsafe.Pointer(addr)); err != nil {
			return err
		}
		a, err := e.SlotAddr(int(slot))
		if err != nil {
			return err
		}
		*addr = C.uint64_t(a)
		return nil
	})
}

//export moe_engine_max_pin
func moe_engine_max_pin(handle C.uint64_t, n *C.int32_t) C.int32_t {
	return withEngine(handle, func(e *engine.Engine) error {
		if err := nonNil("n", unsafe.Pointer(n)); err != nil {
			return err
		}
		p, err := e.Plan()
		if err != nil {
			return err
		}
		*n = C.int32_t(p.Slots)
		return nil
	})
}

//export moe_request_begin
func moe_request_begin(handle C.uint64_t, req *C.uint64_t) C.int32_t {
	return withEngine(handle, func(e *engine.Engine) error {
		if err := nonNil("req", unsafe.Pointer(req)); err != nil {
			return err
		}
		id, err := e.BeginRequest()
		if err != nil {
			return err
		}
		*req = C.uint64_t(id)
		return nil
	})
}

//export moe_request_end
func moe_request_end(handle C.uint64_t, req C.uint64_t) C.int32_t {
	return withEngine(handle, func(e *engine.Engine) error { return e.EndRequest(uint64(req)) })
}

//export moe_observe
func moe_observe(handle C.uint64_t, layer C.int32_t, nreq C.int32_t, reqs *C.uint64_t, counts *C.float) C.int32_t {
	return withEngine(handle, func(e *engine.Engine) error {
		if nreq < 0 || nreq > 1<<20 {
			return fmt.Errorf("%w: nreq %d out of range", engine.ErrInvalid, nreq)
		}
		if nreq == 0 {
			return nil
		}
		if reqs == nil || counts == nil {
			return fmt.Errorf("%w: reqs and counts must not be NULL", engine.ErrInvalid)
		}
		p, err := e.Plan()
		if err != nil {
			return err
		}
		E := p.NumExperts
		ids := unsafe.Slice((*uint64)(unsafe.Pointer(reqs)), int(nreq))
		flat := unsafe.Slice((*float32)(unsafe.Pointer(counts)), int(nreq)*E)
		rows := make([][]float32, nreq)
		for i := range rows {
			rows[i] = flat[i*E : (i+1)*E : (i+1)*E]
		}
		return e.Observe(int(layer), ids, rows)
	})
}

// experts copies a C array of expert ids.
func expertList(n C.int32_t, experts *C.int32_t) ([]int32, error) {
	if n < 0 || n > 1<<20 {
		return nil, fmt.Errorf("%w: n %d out of range", engine.ErrInvalid, n)
	}
	if n == 0 {
		return nil, nil
	}
	if experts == nil {
		return nil, fmt.Errorf("%w: experts is NULL", engine.ErrInvalid)
	}
	return append([]int32(nil), unsafe.Slice((*int32)(unsafe.Pointer(experts)), int(n))...), nil
}

//export moe_acquire
func moe_acquire(handle C.uint64_t, layer C.int32_t, n C.int32_t, experts *C.int32_t, slots *C.int32_t, lease *C.uint64_t, stream C.uint64_t) C.int32_t {
	return withEngine(handle, func(e *engine.Engine) error {
		xs, err := expertList(n, experts)
		if err != nil {
			return err
		}
		if (n > 0 && slots == nil) || lease == nil {
			return fmt.Errorf("%w: slots and lease must not be NULL", engine.ErrInvalid)
		}
		out := make([]int32, len(xs))
		id, err := e.Acquire(int(layer), xs, out, uintptr(stream))
		if err != nil {
			return err
		}
		if n > 0 {
			copy(unsafe.Slice((*int32)(unsafe.Pointer(slots)), int(n)), out)
		}
		*lease = C.uint64_t(id)
		return nil
	})
}

//export moe_release
func moe_release(handle C.uint64_t, lease C.uint64_t, stream C.uint64_t) C.int32_t {
	return withEngine(handle, func(e *engine.Engine) error {
		err := e.Release(uint64(lease), uintptr(stream))
		if e.Closed() && e.Leases() == 0 {
			_, _ = unregister(uint64(handle))
		}
		return err
	})
}

//export moe_layer_ffn
func moe_layer_ffn(handle C.uint64_t, layer C.int32_t, n C.int32_t, experts *C.int32_t, stream C.uint64_t,
	x C.uint64_t, out C.uint64_t, scratch C.uint64_t, topk C.uint64_t, weights C.uint64_t,
	tokens C.int64_t, k C.int64_t, dtype C.int32_t) C.int32_t {
	return withEngine(handle, func(e *engine.Engine) error {
		xs, err := expertList(n, experts)
		if err != nil {
			return err
		}
		dt, err := engine.ActivationDType(int32(dtype))
		if err != nil {
			return err
		}
		return e.LayerFFN(engine.FFNCall{
			Layer: int(layer), Experts: xs, Stream: uintptr(stream),
			X: uint64(x), Out: uint64(out), Scratch: uint64(scratch), TopK: uint64(topk), Weights: uint64(weights),
			T: int64(tokens), K: int64(k), DType: dt, WDType: godtype.F32,
		})
	})
}

//export moe_capture_begin
func moe_capture_begin(handle C.uint64_t) C.int32_t {
	return withEngine(handle, func(e *engine.Engine) error { return e.CaptureBegin() })
}

//export moe_capture_end
func moe_capture_end(handle C.uint64_t, layers *C.int32_t) C.int32_t {
	return withEngine(handle, func(e *engine.Engine) error {
		if layers == nil {
			return fmt.Errorf("%w: layers must not be NULL", engine.ErrInvalid)
		}
		n, err := e.CaptureEnd()
		*layers = C.int32_t(n)
		return err
	})
}

//export moe_graph_step
func moe_graph_step(handle C.uint64_t, stream C.uint64_t, nreq C.int32_t, reqs *C.uint64_t) C.int32_t {
	return withEngine(handle, func(e *engine.Engine) error {
		if nreq < 0 || nreq > 1<<20 || (nreq > 0 && reqs == nil) {
			return fmt.Errorf("%w: %d requests at %p", engine.ErrInvalid, nreq, reqs)
		}
		var ids []uint64
		if nreq > 0 {
			ids = unsafe.Slice((*uint64)(unsafe.Pointer(reqs)), int(nreq))
		}
		return e.GraphStep(uintptr(stream), ids)
	})
}

//export moe_ffn_shape
func moe_ffn_shape(handle C.uint64_t, hidden *C.int64_t, inter *C.int64_t, dtype *C.int32_t) C.int32_t {
	return withEngine(handle, func(e *engine.Engine) error {
		if hidden == nil || inter == nil || dtype == nil {
			return fmt.Errorf("%w: hidden, inter and dtype must not be NULL", engine.ErrInvalid)
		}
		h, i, d, err := e.FFNShape()
		if err != nil {
			return err
		}
		*hidden, *inter, *dtype = C.int64_t(h), C.int64_t(i), C.int32_t(engine.ActivationCode(d))
		return nil
	})
}

//export moe_engine_progress
func moe_engine_progress(handle C.uint64_t, done *C.int64_t, total *C.int64_t) C.int32_t {
	return withEngine(handle, func(e *engine.Engine) error {
		if done == nil || total == nil {
			return fmt.Errorf("%w: done and total must not be NULL", engine.ErrInvalid)
		}
		d, t := e.Progress()
		*done, *total = C.int64_t(d), C.int64_t(t)
		return nil
	})
}

//export moe_device_memory
func moe_device_memory(device C.int32_t, total *C.int64_t, free *C.int64_t) C.int32_t {
	return guard(func() error {
		if total == nil || free == nil {
			return fmt.Errorf("%w: total and free must not be NULL", engine.ErrInvalid)
		}
		t, f, err := deviceMemory(int(device))
		if err != nil {
			return err
		}
		*total, *free = C.int64_t(t), C.int64_t(f)
		return nil
	})
}

//export moe_hint
func moe_hint(handle C.uint64_t, layer C.int32_t, n C.int32_t, experts *C.int32_t) C.int32_t {
	return withEngine(handle, func(e *engine.Engine) error {
		xs, err := expertList(n, experts)
		if err != nil {
			return err
		}
		return e.Hint(int(layer), xs)
	})
}

//export moe_stats
func moe_stats(handle C.uint64_t, buf *C.char, capacity C.int64_t, needed *C.int64_t) C.int32_t {
	return withEngine(handle, func(e *engine.Engine) error {
		stats, err := e.Stats()
		if err != nil {
			return err
		}
		return writeJSON(stats, buf, capacity, needed)
	})
}

//export moe_reset_stats
func moe_reset_stats(handle C.uint64_t) C.int32_t {
	return withEngine(handle, func(e *engine.Engine) error { return e.ResetStats() })
}

//export moe_save_trace
func moe_save_trace(handle C.uint64_t, path *C.char) C.int32_t {
	return withEngine(handle, func(e *engine.Engine) error {
		if err := nonNil("path", unsafe.Pointer(path)); err != nil {
			return err
		}
		return e.SaveTrace(C.GoString(path))
	})
}

//export moe_engine_tune
func moe_engine_tune(handle C.uint64_t, tuning *C.char) C.int32_t {
	return withEngine(handle, func(e *engine.Engine) error {
		if err := nonNil("tuning_json", unsafe.Pointer(tuning)); err != nil {
			return err
		}
		t, err := engine.ParseTuning([]byte(C.GoString(tuning)))
		if err != nil {
			return err
		}
		return e.Tune(t)
	})
}

//export moe_engine_plan
func moe_engine_plan(handle C.uint64_t, buf *C.char, capacity C.int64_t, needed *C.int64_t) C.int32_t {
	return withEngine(handle, func(e *engine.Engine) error {
		plan, err := e.Plan()
		if err != nil {
			return err
		}
		return writeJSON(plan, buf, capacity, needed)
	})
}

//export moe_runtime_stats
func moe_runtime_stats(buf *C.char, capacity C.int64_t, needed *C.int64_t) C.int32_t {
	return guard(func() error {
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return writeJSON(map[string]any{
			"goroutines": runtime.NumGoroutine(),
			"heap_alloc": ms.HeapAlloc,
			"heap_sys":   ms.HeapSys,
			"engines":    liveEngines(),
		}, buf, capacity, needed)
	})
}

//export moe_debug_panic
func moe_debug_panic(handle C.uint64_t) C.int32_t {
	return withEngine(handle, func(e *engine.Engine) error {
		if os.Getenv("MOE_INFINITY_TEST_HOOKS") != "1" {
			return fmt.Errorf("%w: moe_debug_panic needs MOE_INFINITY_TEST_HOOKS=1", engine.ErrUnsupported)
		}
		e.DebugPanic()
		return nil
	})
}
