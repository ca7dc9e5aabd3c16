package main

import (
	"errors"
	"fmt"
	"io/fs"
	"syscall"
	"testing"

	"github.com/moe-infinity/moe_infinity/go/engine"
	"github.com/moe-infinity/moe_infinity/go/trace"
	"github.com/stretchr/testify/assert"
)

func TestStatusOf_TraceSaveErrors(t *testing.T) {
	enospc := &fs.PathError{Op: "write", Path: "/x/.trace.bin.tmp-1", Err: syscall.ENOSPC}
	noSpace := fmt.Errorf("%w: cannot save the trace to /x/trace.bin; the previous trace file was kept unchanged (%w)",
		trace.ErrNoSpace, enospc)
	tests := []struct {
		name string
		err  error
		want int
	}{
		{"disk full", noSpace, statusIO},
		{"disk full at close", fmt.Errorf("saving trace: %w", noSpace), statusIO},
		{"disk full joined with another error at close", errors.Join(fmt.Errorf("saving trace: %w", noSpace), engine.ErrClosed), statusIO},
		{"corrupt trace", fmt.Errorf("trace: load x: %w", trace.ErrCorrupt), statusFormat},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			assert.Equal(t, statusNames[tc.want], statusNames[statusOf(tc.err)])
		})
	}
}
