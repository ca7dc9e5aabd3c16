// Package store reads Hugging Face safetensors checkpoints directly through
// read-only memory mappings, and indexes the routed experts of
// mixture-of-experts models so that an offloading engine can address every
// expert's weights as a byte range.
//
// A Checkpoint is built with Open (a directory, a .safetensors file or a
// model.safetensors.index.json) or New plus AddFile/AddHost. Tensor bytes are
// views into the mappings (or into caller-owned host memory): they are
// read-only, and must not be used after Checkpoint.Close.
package store

import (
	"errors"
	"fmt"
	"strings"
)

// ErrClosed is returned by Checkpoint methods called after Close (including a
// second Close).
var ErrClosed = errors.New("store: checkpoint is closed")

// ErrNotFound is wrapped by errors for a tensor, role or expert that does
// not exist.
var ErrNotFound = errors.New("store: not found")

// ErrDuplicate is wrapped by errors for a tensor name registered twice.
var ErrDuplicate = errors.New("store: duplicate tensor")

// ErrExpertLayout is wrapped by every error Checkpoint.Experts returns for an
// inconsistent MoE module (mixed layouts, missing experts or roles, shape or
// dtype mismatches).
var ErrExpertLayout = errors.New("store: inconsistent expert layout")

// FormatError reports malformed or inconsistent safetensors or index data.
type FormatError struct {
	// File is the path of the offending file, or "" when unknown (for
	// example when ParseHeader is called on a bare buffer).
	File string
	// Tensor is the name of the offending tensor or index entry, or "".
	Tensor string
	// Msg describes the problem.
	Msg string

	err error // optional sentinel returned by Unwrap
}

// Error formats the error as
// `store: <file>: tensor "<name>": <msg>`, omitting empty parts.
func (e *FormatError) Error() string {
	var b strings.Builder
	b.WriteString("store: ")
	if e.File != "" {
		b.WriteString(e.File)
		b.WriteString(": ")
	}
	if e.Tensor != "" {
		fmt.Fprintf(&b, "tensor %q: ", e.Tensor)
	}
	b.WriteString(e.Msg)
	return b.String()
}

// Unwrap returns the sentinel error (ErrNotFound, ErrDuplicate, ...) this
// error is an instance of, or nil.
func (e *FormatError) Unwrap() error { return e.err }

func formatErr(tensor, format string, args ...any) *FormatError {
	return &FormatError{Tensor: tensor, Msg: fmt.Sprintf(format, args...)}
}

// withFile sets the file name on a *FormatError (if err is one and has no
// file yet) and returns err.
func withFile(err error, file string) error {
	var fe *FormatError
	if errors.As(err, &fe) && fe.File == "" {
		fe.File = file
	}
	return err
}
