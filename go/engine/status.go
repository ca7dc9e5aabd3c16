package engine

import (
	"errors"
	"io/fs"
	"os"

	"github.com/moe-infinity/moe_infinity/go/backend"
	"github.com/moe-infinity/moe_infinity/go/layout"
	"github.com/moe-infinity/moe_infinity/go/requant"
	"github.com/moe-infinity/moe_infinity/go/store"
	"github.com/moe-infinity/moe_infinity/go/trace"
)

// Status is the class of an engine error, as the C ABI reports it
// (MOE_OK and MOE_ERR_* of capi/moe_infinity.h; capi/abi_test.go checks
// the header against these values and names, and tests/test_native_abi.py
// checks that Python raises one exception class for each).
type Status int32

// The statuses. The values cross the C ABI: they never change.
const (
	StatusOK                Status = 0
	StatusInvalid           Status = 1
	StatusNotFound          Status = 2
	StatusIO                Status = 3
	StatusFormat            Status = 4
	StatusBudget            Status = 5
	StatusClosed            Status = 6
	StatusState             Status = 7
	StatusUnsupported       Status = 8
	StatusInternal          Status = 9
	StatusBuffer            Status = 10
	StatusHandle            Status = 11
	StatusCheckpointChanged Status = 12
)

// StatusNames are the header's names of the statuses.
var StatusNames = map[Status]string{
	StatusOK: "MOE_OK", StatusInvalid: "MOE_ERR_INVALID", StatusNotFound: "MOE_ERR_NOT_FOUND",
	StatusIO: "MOE_ERR_IO", StatusFormat: "MOE_ERR_FORMAT", StatusBudget: "MOE_ERR_BUDGET",
	StatusClosed: "MOE_ERR_CLOSED", StatusState: "MOE_ERR_STATE", StatusUnsupported: "MOE_ERR_UNSUPPORTED",
	StatusInternal: "MOE_ERR_INTERNAL", StatusBuffer: "MOE_ERR_BUFFER", StatusHandle: "MOE_ERR_HANDLE",
	StatusCheckpointChanged: "MOE_ERR_CHECKPOINT_CHANGED",
}

// String is the header's name ("MOE_ERR_INVALID").
func (s Status) String() string {
	if n, ok := StatusNames[s]; ok {
		return n
	}
	return "MOE_ERR_UNKNOWN"
}

var (
	// ErrBuffer marks an output buffer too small for the answer.
	ErrBuffer = errors.New("output buffer too small")
	// ErrHandle marks an engine handle that is unknown (closed or never
	// created).
	ErrHandle = errors.New("unknown engine handle")
)

// Code classifies err: the one place that decides which status an error
// is. An error that joins several keeps the first class in this order.
func Code(err error) Status {
	var fe *store.FormatError
	var fault *store.FaultError
	switch {
	case err == nil:
		return StatusOK
	case errors.Is(err, store.ErrCheckpointChanged):
		return StatusCheckpointChanged
	case errors.As(err, &fault):
		// A fault no checkpoint file explains is a bug.
		return StatusInternal
	case errors.Is(err, ErrBuffer):
		return StatusBuffer
	case errors.Is(err, ErrHandle):
		return StatusHandle
	case errors.Is(err, trace.ErrNoSpace):
		return StatusIO // a full disk is an I/O error, whatever else it was joined with
	case errors.Is(err, ErrUnsupported), errors.Is(err, requant.ErrSource):
		return StatusUnsupported
	case errors.Is(err, ErrClosed), errors.Is(err, backend.ErrClosed), errors.Is(err, store.ErrClosed):
		return StatusClosed
	case errors.Is(err, ErrBudget):
		return StatusBudget
	case errors.Is(err, ErrState):
		return StatusState
	case errors.As(err, &fe), errors.Is(err, trace.ErrCorrupt), errors.Is(err, layout.ErrCheckpoint):
		return StatusFormat
	case errors.Is(err, fs.ErrNotExist):
		return StatusNotFound
	case errors.Is(err, ErrInvalid):
		return StatusInvalid
	}
	var pe *fs.PathError
	if errors.As(err, &pe) || errors.Is(err, os.ErrPermission) {
		return StatusIO
	}
	return StatusInvalid
}
