//go:build cuda

// Package cuda is the GPU backend of the engine: the device tier is one
// cuMemAlloc'ed arena of slots on the GPU, every expert lives in pinned host
// memory, copies run on dedicated streams and CUDA events order them with
// the compute on PyTorch's stream without the host waiting.
//
// It uses the device's primary context (the one PyTorch uses), through
// gorgonia.org/cu where cu has the call and through the small C helpers
// below where it has not (pinned host memory, raw stream handles, events).
// Every call that touches the driver runs on a locked OS thread with the
// primary context current (see onDevice).
package cuda

/*
#cgo LDFLAGS: -lcuda
#include <cuda.h>
#include <stdlib.h>
#include <stdint.h>

// Makes ctx current unless it already is: on a thread that keeps it (the
// engine's copy driver), a thread-local read instead of cuCtxSetCurrent.
static CUresult moe_set_ctx(uintptr_t ctx) {
	CUcontext cur = 0;
	if (cuCtxGetCurrent(&cur) == CUDA_SUCCESS && (uintptr_t)cur == ctx) return CUDA_SUCCESS;
	return cuCtxSetCurrent((CUcontext)ctx);
}
static CUresult moe_host_register(void *p, size_t n, unsigned int flags) { return cuMemHostRegister(p, n, flags); }
static CUresult moe_host_unregister(void *p) { return cuMemHostUnregister(p); }
static CUresult moe_host_alloc(void **p, size_t n) { return cuMemHostAlloc(p, n, CU_MEMHOSTALLOC_PORTABLE); }
static CUresult moe_host_alloc_mapped(void **p, size_t n) {
	return cuMemHostAlloc(p, n, CU_MEMHOSTALLOC_PORTABLE | CU_MEMHOSTALLOC_DEVICEMAP);
}
static CUresult moe_host_free(void *p) { return cuMemFreeHost(p); }
static CUresult moe_mem_alloc(uint64_t *p, size_t n) { CUdeviceptr d = 0; CUresult r = cuMemAlloc(&d, n); *p = (uint64_t)d; return r; }
static CUresult moe_mem_free(uint64_t p) { return cuMemFree((CUdeviceptr)p); }
static CUresult moe_mem_info(size_t *free_, size_t *total) { return cuMemGetInfo(free_, total); }
static CUresult moe_module_unload(uintptr_t m) { return cuModuleUnload((CUmodule)m); }
// Loads a module from NUL-terminated PTX; the JIT compiler's error log
// (NUL-terminated) goes to log, n bytes.
static CUresult moe_module_load(uintptr_t *m, const char *image, char *log, size_t n) {
	CUjit_option opts[2] = {CU_JIT_ERROR_LOG_BUFFER, CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES};
	void *vals[2] = {log, (void *)(uintptr_t)n};
	CUmodule mod = 0;
	CUresult r = cuModuleLoadDataEx(&mod, image, 2, opts, vals);
	*m = (uintptr_t)mod;
	return r;
}
static CUresult moe_stream_create(uintptr_t *s, int priority) {
	CUstream st = 0;
	CUresult r = cuStreamCreateWithPriority(&st, CU_STREAM_NON_BLOCKING, priority);
	*s = (uintptr_t)st;
	return r;
}
static CUresult moe_stream_destroy(uintptr_t s) { return cuStreamDestroy((CUstream)s); }
static CUresult moe_stream_sync(uintptr_t s) { return cuStreamSynchronize((CUstream)s); }
static CUresult moe_priority_range(int *least, int *greatest) { return cuCtxGetStreamPriorityRange(least, greatest); }
static CUresult moe_event_create(uintptr_t *e, int blocking) {
	CUevent ev = 0;
	CUresult r = cuEventCreate(&ev, CU_EVENT_DISABLE_TIMING | (blocking ? CU_EVENT_BLOCKING_SYNC : 0));
	*e = (uintptr_t)ev;
	return r;
}
static CUresult moe_event_create_timed(uintptr_t *e) {
	CUevent ev = 0;
	CUresult r = cuEventCreate(&ev, CU_EVENT_DEFAULT);
	*e = (uintptr_t)ev;
	return r;
}
static CUresult moe_event_elapsed(float *ms, uintptr_t a, uintptr_t b) { return cuEventElapsedTime(ms, (CUevent)a, (CUevent)b); }
static CUresult moe_event_destroy(uintptr_t e) { return cuEventDestroy((CUevent)e); }
static CUresult moe_event_record(uintptr_t e, uintptr_t s) { return cuEventRecord((CUevent)e, (CUstream)s); }
static CUresult moe_event_sync(uintptr_t e) { return cuEventSynchronize((CUevent)e); }
static CUresult moe_event_query(uintptr_t e) { return cuEventQuery((CUevent)e); }
static CUresult moe_stream_wait(uintptr_t s, uintptr_t e) { return cuStreamWaitEvent((CUstream)s, (CUevent)e, 0); }
static CUresult moe_copy_htod(uint64_t dst, const void *src, size_t n, uintptr_t s) {
	return cuMemcpyHtoDAsync((CUdeviceptr)dst, src, n, (CUstream)s);
}
static CUresult moe_copy_dtoh(void *dst, uint64_t src, size_t n) { return cuMemcpyDtoH(dst, (CUdeviceptr)src, n); }
static CUresult moe_copy_dtoh_async(void *dst, uint64_t src, size_t n, uintptr_t s) {
	return cuMemcpyDtoHAsync(dst, (CUdeviceptr)src, n, (CUstream)s);
}
static CUresult moe_copy_dtod_async(uint64_t dst, uint64_t src, size_t n, uintptr_t s) {
	return cuMemcpyDtoDAsync((CUdeviceptr)dst, (CUdeviceptr)src, n, (CUstream)s);
}
static CUresult moe_memset32_async(uint64_t dst, unsigned int v, size_t n, uintptr_t s) {
	return cuMemsetD32Async((CUdeviceptr)dst, v, n, (CUstream)s);
}
static CUresult moe_host_device_ptr(uint64_t *d, void *p) {
	CUdeviceptr dp = 0;
	CUresult r = cuMemHostGetDevicePointer(&dp, p, 0);
	*d = (uint64_t)dp;
	return r;
}
// The most 8-byte parameters a kernel launched with moe_launch takes
// (moe_publish_wait's 19); the FFN kernels take one struct (moe_launch_struct).
#define MOE_MAX_PARAMS 19
// Launches f with n (<= MOE_MAX_PARAMS) 8-byte parameters whose values are
// in vals: the parameter array lives on the C stack, so no Go memory holds
// pointers.
static CUresult moe_launch(uintptr_t f, unsigned int gx, unsigned int gy, unsigned int bx, uintptr_t s,
                           const uint64_t *vals, int n) {
	void *params[MOE_MAX_PARAMS];
	if (n > MOE_MAX_PARAMS) return CUDA_ERROR_INVALID_VALUE;
	for (int i = 0; i < n; i++) params[i] = (void *)&vals[i];
	return cuLaunchKernel((CUfunction)f, gx, gy, 1, bx, 1, 1, 0, (CUstream)s, params, 0);
}
// Launches f, whose one parameter is a struct passed by value (the FFN
// kernels, cuda/moe_params.h), with that struct at p: cuLaunchKernel copies
// it before it returns (also into a graph being captured).
static CUresult moe_launch_struct(uintptr_t f, unsigned int gx, unsigned int gy, unsigned int bx, uintptr_t s,
                                  const void *p) {
	void *params[1] = {(void *)p};
	return cuLaunchKernel((CUfunction)f, gx, gy, 1, bx, 1, 1, 0, (CUstream)s, params, 0);
}
static CUresult moe_pci_bus_id(char *buf, int n, int dev) { return cuDeviceGetPCIBusId(buf, n, (CUdevice)dev); }
static const char *moe_error_name(CUresult r) {
	const char *s = 0;
	if (cuGetErrorName(r, &s) != CUDA_SUCCESS || s == 0) return "CUDA_ERROR_UNKNOWN";
	return s;
}
static const char *moe_error_string(CUresult r) {
	const char *s = 0;
	if (cuGetErrorString(r, &s) != CUDA_SUCCESS || s == 0) return "unknown error";
	return s;
}
*/
import "C"

import (
	"fmt"
	"runtime"
	"strings"
	"unsafe"

	"gorgonia.org/cu"
)

// Error is a CUDA driver error with the call that returned it.
type Error struct {
	Call string
	Code int
	Name string
	Msg  string
}

// Error formats the failed call, the driver's error name and message.
func (e *Error) Error() string {
	return fmt.Sprintf("cuda: %s failed: %s (%d): %s", e.Call, e.Name, e.Code, e.Msg)
}

func check(call string, r C.CUresult) error {
	if r == C.CUDA_SUCCESS {
		return nil
	}
	return &Error{Call: call, Code: int(r), Name: C.GoString(C.moe_error_name(r)), Msg: C.GoString(C.moe_error_string(r))}
}

// device is the primary context of one GPU. Calls into the driver go
// through do, which runs them on a locked OS thread with the context
// current, because a goroutine may otherwise move between threads and a
// thread (a Python thread included) may have no or another context.
type device struct {
	ordinal int
	dev     cu.Device
	ctx     cu.CUContext
}

func openDevice(ordinal int) (*device, error) {
	n, err := cu.NumDevices()
	if err != nil {
		return nil, fmt.Errorf("cuda: counting devices: %w", err)
	}
	if ordinal < 0 || ordinal >= n {
		return nil, fmt.Errorf("cuda: device %d does not exist (%d devices)", ordinal, n)
	}
	d := &device{ordinal: ordinal, dev: cu.Device(ordinal)}
	var ctxErr error
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	// Never wrap the primary context in cu.Ctx: its finalizer would destroy
	// the context PyTorch uses.
	d.ctx, ctxErr = d.dev.RetainPrimaryCtx()
	if ctxErr != nil {
		return nil, fmt.Errorf("cuda: retaining the primary context of device %d: %w", ordinal, ctxErr)
	}
	return d, nil
}

// ctxPtr is the raw CUcontext of the primary context.
func (d *device) ctxPtr() C.uintptr_t {
	return C.uintptr_t(uintptr(*(*unsafe.Pointer)(unsafe.Pointer(&d.ctx))))
}

// do runs f on a locked thread with the primary context current.
func (d *device) do(f func() error) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if err := check("cuCtxSetCurrent", C.moe_set_ctx(d.ctxPtr())); err != nil {
		return err
	}
	return f()
}

func (d *device) release() error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	return d.dev.ReleasePrimaryCtx()
}

func (d *device) memInfo() (free, total int64, err error) {
	err = d.do(func() error {
		free, total, err = memInfo()
		return err
	})
	return
}

// memInfo returns the free and total memory of the current context's
// device (inside device.do).
func memInfo() (free, total int64, err error) {
	var f, t C.size_t
	err = check("cuMemGetInfo", C.moe_mem_info(&f, &t))
	return int64(f), int64(t), err
}

// jitLogBytes bounds the JIT compiler's error log moduleLoad reports.
const jitLogBytes = 16 << 10

// moduleLoad loads a module from PTX (inside device.do). When the driver
// rejects it, the error carries the JIT compiler's log (which line, which
// instruction), not only the driver's code.
func moduleLoad(ptx string) (cu.Module, error) {
	img := C.CString(ptx)
	defer C.free(unsafe.Pointer(img))
	log := (*C.char)(C.calloc(jitLogBytes, 1))
	defer C.free(unsafe.Pointer(log))
	var h C.uintptr_t
	err := check("cuModuleLoadDataEx", C.moe_module_load(&h, img, log, jitLogBytes))
	if err != nil {
		if msg := strings.TrimSpace(C.GoString(log)); msg != "" {
			err = fmt.Errorf("%w; the JIT compiler says: %s", err, msg)
		}
		return cu.Module{}, err
	}
	u := uintptr(h)
	return *(*cu.Module)(unsafe.Pointer(&u)), nil
}

func moduleUnload(m cu.Module) error {
	return check("cuModuleUnload", C.moe_module_unload(C.uintptr_t(*(*uintptr)(unsafe.Pointer(&m)))))
}

// kernelPTX returns the PTX of the named kernel build (selectPTX) for this
// device, or an error naming the device and its compute capability.
func (d *device) kernelPTX(build string) (string, error) {
	major, minor, err := d.dev.ComputeCapability()
	if err != nil {
		return "", fmt.Errorf("cuda: reading the compute capability of device %d: %w", d.ordinal, err)
	}
	ptx, err := selectPTX(build, major, minor)
	if err != nil {
		name, _ := d.dev.Name()
		return "", fmt.Errorf("device %d (%s): %w", d.ordinal, name, err)
	}
	return ptx, nil
}

func (d *device) pciBusID() string {
	buf := make([]byte, 32)
	if C.moe_pci_bus_id((*C.char)(unsafe.Pointer(&buf[0])), C.int(len(buf)), C.int(d.ordinal)) != C.CUDA_SUCCESS {
		return ""
	}
	n := 0
	for n < len(buf) && buf[n] != 0 {
		n++
	}
	return string(buf[:n])
}

// The thin wrappers below must be called inside device.do.

func memAlloc(n int64) (uint64, error) {
	var p C.uint64_t
	err := check("cuMemAlloc", C.moe_mem_alloc(&p, C.size_t(n)))
	return uint64(p), err
}

func memFree(p uint64) error { return check("cuMemFree", C.moe_mem_free(C.uint64_t(p))) }

func hostRegister(p unsafe.Pointer, n int64, readOnly bool) error {
	// DEVICEMAP: mapped mode's kernels read experts in place over PCIe.
	flags := C.uint(C.CU_MEMHOSTREGISTER_PORTABLE | C.CU_MEMHOSTREGISTER_DEVICEMAP)
	if readOnly {
		flags |= C.CU_MEMHOSTREGISTER_READ_ONLY
	}
	return check("cuMemHostRegister", C.moe_host_register(p, C.size_t(n), flags))
}

func hostUnregister(p unsafe.Pointer) error {
	return check("cuMemHostUnregister", C.moe_host_unregister(p))
}

func hostAlloc(n int64) (unsafe.Pointer, error) {
	var p unsafe.Pointer
	err := check("cuMemHostAlloc", C.moe_host_alloc(&p, C.size_t(n)))
	return p, err
}

// hostAllocMapped allocates n bytes of pinned host memory that kernels can
// also read and write (its device address: hostDevicePtr).
func hostAllocMapped(n int64) (unsafe.Pointer, error) {
	var p unsafe.Pointer
	err := check("cuMemHostAlloc", C.moe_host_alloc_mapped(&p, C.size_t(n)))
	return p, err
}

func hostFree(p unsafe.Pointer) error { return check("cuMemFreeHost", C.moe_host_free(p)) }

func streamCreate(priority int) (uintptr, error) {
	var s C.uintptr_t
	err := check("cuStreamCreateWithPriority", C.moe_stream_create(&s, C.int(priority)))
	return uintptr(s), err
}

func streamDestroy(s uintptr) error {
	return check("cuStreamDestroy", C.moe_stream_destroy(C.uintptr_t(s)))
}

func streamSync(s uintptr) error {
	return check("cuStreamSynchronize", C.moe_stream_sync(C.uintptr_t(s)))
}

func priorityRange() (least, greatest int, err error) {
	var l, g C.int
	err = check("cuCtxGetStreamPriorityRange", C.moe_priority_range(&l, &g))
	return int(l), int(g), err
}

// eventCreate makes an event for stream ordering (never waited on by the
// host).
func eventCreate() (uintptr, error) { return newEvent(false) }

// blockingEventCreate makes an event the host waits on: its
// synchronisation sleeps instead of spinning a core, which matters with
// dozens of copies in flight per decoded token.
func blockingEventCreate() (uintptr, error) { return newEvent(true) }

func newEvent(blocking bool) (uintptr, error) {
	var e C.uintptr_t
	b := C.int(0)
	if blocking {
		b = 1
	}
	err := check("cuEventCreate", C.moe_event_create(&e, b))
	return uintptr(e), err
}

// timedEventCreate makes an event that records time, for measurements
// (eventElapsed).
func timedEventCreate() (uintptr, error) {
	var e C.uintptr_t
	err := check("cuEventCreate", C.moe_event_create_timed(&e))
	return uintptr(e), err
}

// eventElapsed is the GPU time between two completed timed events, in
// milliseconds (resolution ~0.5 µs).
func eventElapsed(a, b uintptr) (float64, error) {
	var ms C.float
	err := check("cuEventElapsedTime", C.moe_event_elapsed(&ms, C.uintptr_t(a), C.uintptr_t(b)))
	return float64(ms), err
}

func eventDestroy(e uintptr) error {
	return check("cuEventDestroy", C.moe_event_destroy(C.uintptr_t(e)))
}

func eventRecord(e, s uintptr) error {
	return check("cuEventRecord", C.moe_event_record(C.uintptr_t(e), C.uintptr_t(s)))
}

func eventSync(e uintptr) error { return check("cuEventSynchronize", C.moe_event_sync(C.uintptr_t(e))) }

// eventDone reports whether the work e last recorded has completed
// (cuEventQuery; false on any error, so that callers fall back to waiting).
func eventDone(e uintptr) bool { return C.moe_event_query(C.uintptr_t(e)) == C.CUDA_SUCCESS }

func streamWait(s, e uintptr) error {
	return check("cuStreamWaitEvent", C.moe_stream_wait(C.uintptr_t(s), C.uintptr_t(e)))
}

func copyHtoD(dst uint64, src unsafe.Pointer, n int64, s uintptr) error {
	return check("cuMemcpyHtoDAsync", C.moe_copy_htod(C.uint64_t(dst), src, C.size_t(n), C.uintptr_t(s)))
}

// copyDtoHAsync copies n bytes from the device to pinned host memory in
// stream order.
func copyDtoHAsync(dst unsafe.Pointer, src uint64, n int64, s uintptr) error {
	return check("cuMemcpyDtoHAsync", C.moe_copy_dtoh_async(dst, C.uint64_t(src), C.size_t(n), C.uintptr_t(s)))
}

// copyDtoDAsync copies n bytes between device addresses in stream order.
func copyDtoDAsync(dst, src uint64, n int64, s uintptr) error {
	return check("cuMemcpyDtoDAsync", C.moe_copy_dtod_async(C.uint64_t(dst), C.uint64_t(src), C.size_t(n), C.uintptr_t(s)))
}

// memset32Async sets n 32-bit words at dst to v in stream order (v is
// passed by value: nothing on the host must outlive the call).
func memset32Async(dst uint64, v uint32, n int64, s uintptr) error {
	return check("cuMemsetD32Async", C.moe_memset32_async(C.uint64_t(dst), C.uint(v), C.size_t(n), C.uintptr_t(s)))
}

// hostDevicePtr is the device address of registered or pinned host memory.
func hostDevicePtr(p unsafe.Pointer) (uint64, error) {
	var d C.uint64_t
	err := check("cuMemHostGetDevicePointer", C.moe_host_device_ptr(&d, p))
	return uint64(d), err
}

// rawFunc is the CUfunction inside a cu.Function.
func rawFunc(f cu.Function) uintptr { return *(*uintptr)(unsafe.Pointer(&f)) }

// launch runs f on a grid of gx × gy blocks of bx threads on stream s,
// with 8-byte parameters vals (pointers and int64s), without allocating.
func launch(f cu.Function, gx, gy, bx int, s uintptr, vals ...uint64) error {
	if len(vals) == 0 || len(vals) > C.MOE_MAX_PARAMS {
		return fmt.Errorf("cuda: launch with %d parameters", len(vals))
	}
	return check("cuLaunchKernel", C.moe_launch(C.uintptr_t(rawFunc(f)), C.uint(gx), C.uint(gy), C.uint(bx), C.uintptr_t(s),
		(*C.uint64_t)(unsafe.Pointer(&vals[0])), C.int(len(vals))))
}

// launchParams runs the FFN kernel f on a grid of gx × gy blocks of bx
// threads on stream s with its parameter struct *p (kparams.go), passed as
// the one entry of the launch's argument array. p holds no Go pointers.
func launchParams[P kernelParams](f cu.Function, gx, gy, bx int, s uintptr, p *P) error {
	return check("cuLaunchKernel", C.moe_launch_struct(C.uintptr_t(rawFunc(f)), C.uint(gx), C.uint(gy), C.uint(bx), C.uintptr_t(s),
		unsafe.Pointer(p)))
}

func copyDtoH(dst unsafe.Pointer, src uint64, n int64) error {
	return check("cuMemcpyDtoH", C.moe_copy_dtoh(dst, C.uint64_t(src), C.size_t(n)))
}
