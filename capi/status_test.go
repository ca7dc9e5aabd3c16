package main

import (
	"errors"
	"fmt"
	"io/fs"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"

	"github.com/moe-infinity/moe_infinity/go/engine"
	"github.com/moe-infinity/moe_infinity/go/store"
)

func TestStatusOfCheckpointErrors(t *testing.T) {
	changed := &store.ChangedError{Path: "/m/model.safetensors", Loaded: store.FileID{Size: 10}, Now: store.FileID{Size: 5}}
	tests := []struct {
		name string
		err  error
		want int
	}{
		{"changed", changed, statusChanged},
		{"changed, wrapped by a load", fmt.Errorf("loading L0/E1: %w", changed), statusChanged},
		{"changed, joined with another error", errors.Join(engine.ErrInvalid, changed), statusChanged},
		{"a fault no file explains is a bug", &store.FaultError{Addr: 0x1000}, statusInternal},
		{"an unreadable page of an unchanged file", &fs.PathError{Op: "read (mapped, offset 0)", Path: "/m/x", Err: syscall.EIO}, statusIO},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) { assert.Equal(t, tc.want, statusOf(tc.err)) })
	}
}
