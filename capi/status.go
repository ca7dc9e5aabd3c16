package main

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"runtime/debug"
	"sync"
	"syscall"

	"github.com/moe-infinity/moe_infinity/go/backend"
	"github.com/moe-infinity/moe_infinity/go/engine"
	"github.com/moe-infinity/moe_infinity/go/layout"
	"github.com/moe-infinity/moe_infinity/go/store"
	"github.com/moe-infinity/moe_infinity/go/trace"
)

// Status codes; keep in sync with moe_infinity.h (abi_test.go checks).
const (
	statusOK          = 0
	statusInvalid     = 1
	statusNotFound    = 2
	statusIO          = 3
	statusFormat      = 4
	statusBudget      = 5
	statusClosed      = 6
	statusState       = 7
	statusUnsupported = 8
	statusInternal    = 9
	statusBuffer      = 10
	statusHandle      = 11
	statusChanged     = 12
)

// statusNames maps codes to the names used in moe_infinity.h.
var statusNames = map[int]string{
	statusOK: "MOE_OK", statusInvalid: "MOE_ERR_INVALID", statusNotFound: "MOE_ERR_NOT_FOUND",
	statusIO: "MOE_ERR_IO", statusFormat: "MOE_ERR_FORMAT", statusBudget: "MOE_ERR_BUDGET",
	statusClosed: "MOE_ERR_CLOSED", statusState: "MOE_ERR_STATE", statusUnsupported: "MOE_ERR_UNSUPPORTED",
	statusInternal: "MOE_ERR_INTERNAL", statusBuffer: "MOE_ERR_BUFFER", statusHandle: "MOE_ERR_HANDLE",
	statusChanged: "MOE_ERR_CHECKPOINT_CHANGED",
}

// errUnsupported marks features missing from this build.
var errUnsupported = errors.New("unsupported")

// errHandle marks unknown engine handles.
var errHandle = errors.New("unknown engine handle")

// errBuffer marks an output buffer that is too small.
var errBuffer = errors.New("output buffer too small")

// statusOf maps an error to its status code.
func statusOf(err error) int {
	var fe *store.FormatError
	var fault *store.FaultError
	switch {
	case err == nil:
		return statusOK
	case errors.Is(err, store.ErrCheckpointChanged):
		return statusChanged
	case errors.As(err, &fault):
		// A fault no checkpoint file explains is a bug.
		return statusInternal
	case errors.Is(err, errBuffer):
		return statusBuffer
	case errors.Is(err, errHandle):
		return statusHandle
	case errors.Is(err, trace.ErrNoSpace):
		return statusIO // a full disk is an I/O error, whatever else it was joined with
	case errors.Is(err, errUnsupported), errors.Is(err, engine.ErrUnsupported):
		return statusUnsupported
	case errors.Is(err, engine.ErrClosed), errors.Is(err, backend.ErrClosed), errors.Is(err, store.ErrClosed):
		return statusClosed
	case errors.Is(err, engine.ErrBudget):
		return statusBudget
	case errors.Is(err, engine.ErrState):
		return statusState
	case errors.As(err, &fe), errors.Is(err, trace.ErrCorrupt), errors.Is(err, layout.ErrCheckpoint):
		return statusFormat
	case errors.Is(err, fs.ErrNotExist):
		return statusNotFound
	case errors.Is(err, engine.ErrInvalid):
		return statusInvalid
	}
	var pe *fs.PathError
	if errors.As(err, &pe) || errors.Is(err, os.ErrPermission) {
		return statusIO
	}
	return statusInvalid
}

// lastErrors holds each OS thread's last error message. A cgo call runs
// on the calling C thread, so the thread id identifies the caller (for
// Python: the Python thread), giving errno-like semantics.
var lastErrors = struct {
	sync.Mutex
	m map[int]string
}{m: map[int]string{}}

func setLastError(msg string) {
	tid := syscall.Gettid()
	lastErrors.Lock()
	defer lastErrors.Unlock()
	if len(lastErrors.m) > 4096 {
		// Threads come and go; never let the table grow without bound.
		lastErrors.m = map[int]string{}
	}
	lastErrors.m[tid] = msg
}

func lastError() string {
	tid := syscall.Gettid()
	lastErrors.Lock()
	defer lastErrors.Unlock()
	return lastErrors.m[tid]
}

// finish converts err into a status, recording its message.
func finish(err error) int {
	st := statusOf(err)
	if st != statusOK {
		setLastError(err.Error())
	}
	return st
}

// recovered records a recovered panic value as the last error and returns
// statusInternal.
func recovered(r any) int {
	setLastError(fmt.Sprintf("internal error (a bug in moe_infinity, please report it): %v\n%s", r, debug.Stack()))
	return statusInternal
}
