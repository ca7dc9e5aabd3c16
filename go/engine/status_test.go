package engine

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"

	"github.com/moe-infinity/moe_infinity/go/backend"
	"github.com/moe-infinity/moe_infinity/go/layout"
	"github.com/moe-infinity/moe_infinity/go/store"
	"github.com/moe-infinity/moe_infinity/go/trace"
)

func TestCode(t *testing.T) {
	changed := &store.ChangedError{Path: "/m/model.safetensors", Loaded: store.FileID{Size: 10}, Now: store.FileID{Size: 5}}
	enospc := &fs.PathError{Op: "write", Path: "/x/.trace.bin.tmp-1", Err: syscall.ENOSPC}
	noSpace := fmt.Errorf("%w: cannot save the trace to /x/trace.bin; the previous trace file was kept unchanged (%w)",
		trace.ErrNoSpace, enospc)
	for _, tc := range []struct {
		name string
		err  error
		want Status
	}{
		{"nil", nil, StatusOK},
		{"invalid", fmt.Errorf("%w: layer 9", ErrInvalid), StatusInvalid},
		{"missing file", &fs.PathError{Op: "open", Path: "/m/x", Err: fs.ErrNotExist}, StatusNotFound},
		{"permission", &fs.PathError{Op: "open", Path: "/m/x", Err: os.ErrPermission}, StatusIO},
		{"malformed checkpoint", &store.FormatError{File: "/m/x", Msg: "bad header"}, StatusFormat},
		{"checkpoint that does not fit the layout", fmt.Errorf("x: %w", layout.ErrCheckpoint), StatusFormat},
		{"budget", fmt.Errorf("%w: 1 byte", ErrBudget), StatusBudget},
		{"closed engine", ErrClosed, StatusClosed},
		{"closed backend", fmt.Errorf("load: %w", backend.ErrClosed), StatusClosed},
		{"state", ErrState, StatusState},
		{"unsupported", fmt.Errorf("%w: no GPU", ErrUnsupported), StatusUnsupported},
		{"buffer", fmt.Errorf("%w: 10 bytes needed", ErrBuffer), StatusBuffer},
		{"handle", fmt.Errorf("%w 7", ErrHandle), StatusHandle},
		{"anything else", errors.New("?"), StatusInvalid},
		{"changed", changed, StatusCheckpointChanged},
		{"changed, wrapped by a load", fmt.Errorf("loading L0/E1: %w", changed), StatusCheckpointChanged},
		{"changed, joined with another error", errors.Join(ErrInvalid, changed), StatusCheckpointChanged},
		{"a fault no file explains is a bug", &store.FaultError{Addr: 0x1000}, StatusInternal},
		{"an unreadable page of an unchanged file", &fs.PathError{Op: "read (mapped, offset 0)", Path: "/m/x", Err: syscall.EIO}, StatusIO},
		{"disk full", noSpace, StatusIO},
		{"disk full at close", fmt.Errorf("saving trace: %w", noSpace), StatusIO},
		{"disk full joined with another error at close", errors.Join(fmt.Errorf("saving trace: %w", noSpace), ErrClosed), StatusIO},
		{"corrupt trace", fmt.Errorf("trace: load x: %w", trace.ErrCorrupt), StatusFormat},
	} {
		t.Run(tc.name, func(t *testing.T) { assert.Equal(t, tc.want, Code(tc.err), "%v", tc.err) })
	}
}

func TestStatusNames(t *testing.T) {
	assert.Equal(t, "MOE_ERR_CHECKPOINT_CHANGED", StatusCheckpointChanged.String())
	assert.Equal(t, "MOE_OK", StatusOK.String())
	assert.Equal(t, "MOE_ERR_UNKNOWN", Status(99).String())
	assert.Len(t, StatusNames, 13)
}
