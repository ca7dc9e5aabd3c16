package store

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"runtime"
	"runtime/debug"
	"syscall"
	"time"
)

// ErrCheckpointChanged is wrapped by the errors for a mapped checkpoint file
// whose contents changed on disk after it was loaded: truncated or rewritten
// in place (cp new old, rsync --inplace, a full disk). Reading its mapping
// past the new end would kill the process with SIGBUS; the engine reports
// this error instead. The model must be loaded again.
var ErrCheckpointChanged = errors.New("store: checkpoint file changed on disk")

// FileID is what identifies a mapped file's contents as loaded: the file
// (device and inode), its size and its modification time. Writing to the
// file or truncating it changes Size or MtimeNs; unlinking or renaming it
// changes neither (the mapping keeps the old pages alive, so nothing needs
// to be reported).
type FileID struct {
	// Dev and Ino are the device and inode numbers.
	Dev, Ino uint64
	// Size is the file size in bytes.
	Size int64
	// MtimeNs is the modification time in nanoseconds since the Unix epoch.
	MtimeNs int64
}

func fileIDOf(st *syscall.Stat_t) FileID {
	return FileID{Dev: uint64(st.Dev), Ino: st.Ino, Size: st.Size, MtimeNs: st.Mtim.Nano()}
}

// statFD returns the identity of the open file fd.
func statFD(fd int) (FileID, error) {
	var st syscall.Stat_t
	if err := syscall.Fstat(fd, &st); err != nil {
		return FileID{}, err
	}
	return fileIDOf(&st), nil
}

// ChangedError reports a mapped checkpoint file whose identity (FileID)
// differs from the one recorded when it was loaded. It wraps
// ErrCheckpointChanged.
type ChangedError struct {
	// Path is the file's path as it was loaded.
	Path string
	// Loaded and Now are its identity at load and when the change was
	// seen.
	Loaded, Now FileID
}

// Error names the file and what changed, e.g. "store: checkpoint file
// /m/model.safetensors changed on disk after it was loaded (size 123 -> 45
// bytes); reload the model".
func (e *ChangedError) Error() string {
	var what string
	switch {
	case e.Now.Dev != e.Loaded.Dev || e.Now.Ino != e.Loaded.Ino:
		what = "it is another file now"
	case e.Now.Size != e.Loaded.Size:
		what = fmt.Sprintf("size %d -> %d bytes", e.Loaded.Size, e.Now.Size)
	default:
		what = fmt.Sprintf("same size, modified %s -> %s", fmtNs(e.Loaded.MtimeNs), fmtNs(e.Now.MtimeNs))
	}
	return fmt.Sprintf("store: checkpoint file %s changed on disk after it was loaded (%s); reload the model", e.Path, what)
}

func fmtNs(ns int64) string { return time.Unix(0, ns).UTC().Format(time.RFC3339Nano) }

// Unwrap returns ErrCheckpointChanged.
func (e *ChangedError) Unwrap() error { return ErrCheckpointChanged }

// FaultError is a memory fault (SIGBUS or SIGSEGV at a non-nil address)
// that Guard caught while its function read memory.
type FaultError struct {
	// Addr is the faulting address.
	Addr uintptr
	// Msg is the runtime's description of the fault.
	Msg string
}

// Error describes the fault.
func (e *FaultError) Error() string {
	return fmt.Sprintf("store: memory fault at %#x while reading mapped checkpoint memory: %s", e.Addr, e.Msg)
}

// Guard runs read, which reads memory-mapped checkpoint bytes on the
// calling goroutine, and turns a memory fault into a *FaultError instead of
// letting it kill the process: a mapping whose file shrank faults (SIGBUS)
// on every page past the new end. It is the one place where faults become
// errors; every engine reader of mapped memory runs under it (directly, or
// through Checkpoint.Guard, which also names the file).
//
// Faults are caught only on the calling goroutine (debug.SetPanicOnFault is
// per goroutine): a reader that starts goroutines guards each of them. The
// previous setting is restored on return, so calls nest. Other panics
// (including nil dereferences, which are bugs) propagate unchanged.
func Guard(read func() error) (err error) {
	old := debug.SetPanicOnFault(true)
	defer func() {
		debug.SetPanicOnFault(old)
		r := recover()
		if r == nil {
			return
		}
		re, isRuntime := r.(runtime.Error)
		af, hasAddr := r.(interface{ Addr() uintptr })
		if !isRuntime || !hasAddr {
			panic(r)
		}
		err = &FaultError{Addr: af.Addr(), Msg: re.Error()}
	}()
	return read()
}

// Guard is the package Guard with the fault explained (see Explain).
func (c *Checkpoint) Guard(read func() error) error {
	return c.Explain(Guard(read))
}

// Explain turns a *FaultError (anywhere in err's chain) at an address
// inside one of c's mapped files into a *ChangedError when the file's
// identity changed since it was loaded, or else into an I/O error naming
// the file and offset (*fs.PathError wrapping EIO: a disk or network
// filesystem failed to supply the page). Other errors, and faults outside
// c's mappings, are returned unchanged.
func (c *Checkpoint) Explain(err error) error {
	var fe *FaultError
	if !errors.As(err, &fe) {
		return err
	}
	c.mu.RLock()
	defer c.mu.RUnlock()
	for i := range c.files {
		f := &c.files[i]
		if len(f.data) == 0 {
			continue
		}
		base := addrOf(f.data)
		if fe.Addr < base || fe.Addr >= base+uintptr(len(f.data)) {
			continue
		}
		if cerr := f.check(); cerr != nil {
			return cerr
		}
		return &fs.PathError{Op: fmt.Sprintf("read (mapped, offset %d)", fe.Addr-base), Path: f.path, Err: syscall.EIO}
	}
	return err
}

// check compares the file's identity now with the one at load.
func (f *mappedFile) check() error {
	now, err := statFD(int(f.fd.Fd()))
	if err != nil {
		return fmt.Errorf("store: checking checkpoint file %s: %w", f.path, &fs.PathError{Op: "fstat", Path: f.path, Err: err})
	}
	if now != f.id {
		return &ChangedError{Path: f.path, Loaded: f.id, Now: now}
	}
	return nil
}

// CheckFiles checks that the mapped files at paths (as returned by Files or
// Tensor.Source; others, such as HostSource, are skipped) still have the
// identity they had when loaded, with one fstat each, and returns a
// *ChangedError for the first that does not. It is cheap enough to run
// before each layer's reads (see BenchmarkCheckFiles), and catches what no
// fault reveals: a file rewritten in place with its size unchanged.
// Returns ErrClosed after Close.
func (c *Checkpoint) CheckFiles(paths []string) error {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.closed {
		return ErrClosed
	}
	for _, p := range paths {
		i, ok := c.byPath[p]
		if !ok {
			continue
		}
		if err := c.files[i].check(); err != nil {
			return err
		}
	}
	return nil
}

// FileIDs returns the identity each mapped file had when it was loaded,
// by path.
func (c *Checkpoint) FileIDs() map[string]FileID {
	c.mu.RLock()
	defer c.mu.RUnlock()
	out := make(map[string]FileID, len(c.files))
	for _, f := range c.files {
		out[f.path] = f.id
	}
	return out
}

// openForMap opens path for mapping and returns the file (kept open for
// CheckFiles: fstat on it sees the mapped inode even after the path is
// unlinked or renamed over) and its identity.
func openForMap(path string) (*os.File, FileID, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, FileID{}, fmt.Errorf("store: %w", err)
	}
	id, err := statFD(int(f.Fd()))
	if err != nil {
		f.Close()
		return nil, FileID{}, fmt.Errorf("store: %w", &fs.PathError{Op: "fstat", Path: path, Err: err})
	}
	return f, id, nil
}
