package main

import (
	"fmt"
	"runtime/debug"
	"sync"
	"syscall"

	"github.com/moe-infinity/moe_infinity/go/engine"
)

// Errors are classified by engine.Code, the one place that decides an
// error's status (MOE_ERR_* of moe_infinity.h).

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
	st := engine.Code(err)
	if st != engine.StatusOK {
		setLastError(err.Error())
	}
	return int(st)
}

// recovered records a recovered panic value as the last error and returns
// statusInternal.
func recovered(r any) int {
	setLastError(fmt.Sprintf("internal error (a bug in moe_infinity, please report it): %v\n%s", r, debug.Stack()))
	return int(engine.StatusInternal)
}
