package store

import (
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"unsafe"

	"github.com/moe-infinity/moe_infinity/go/dtype"
)

// HostSource is the Tensor.Source of tensors registered with AddHost.
const HostSource = "host"

// Tensor is one tensor available to the engine: a view into a mapped
// safetensors file or a tensor registered from host memory. Its fields and
// bytes must be treated as read-only.
type Tensor struct {
	// Name is the tensor name.
	Name string
	// DType is the element type.
	DType dtype.DType
	// Shape holds the dimensions in elements; empty for a scalar.
	Shape []int64
	// Source is the path of the mapped file holding the tensor, or
	// HostSource ("host") for AddHost tensors.
	Source string

	data []byte
}

// Bytes returns the tensor's data (little-endian, row-major): a view into the
// read-only file mapping or into the registered host memory. Do not modify it
// (writing into a mapping faults) and do not use it after Checkpoint.Close.
// Read a file view under Checkpoint.Guard: if the file shrinks on disk, a
// read past its new end faults (SIGBUS), which only a guard turns into an
// error.
func (t *Tensor) Bytes() []byte { return t.data }

// NumBytes returns the size of the tensor's data in bytes.
func (t *Tensor) NumBytes() int64 { return int64(len(t.data)) }

type mappedFile struct {
	path string
	data []byte
	fd   *os.File // kept open for the identity checks (check)
	id   FileID   // identity at load
}

// indexRef is the index a checkpoint was opened through, used to check that
// every tensor lives in the shard the index names.
type indexRef struct {
	path      string // index file path
	dir       string // directory shard names are relative to
	weightMap map[string]string
}

// Checkpoint is a set of named tensors from memory-mapped safetensors files
// (read-only) and from caller-owned host memory. Lookups are safe for
// concurrent use; AddFile, AddHost and Close are serialised by a mutex and
// may run concurrently with lookups.
type Checkpoint struct {
	mu      sync.RWMutex
	tensors map[string]*Tensor
	files   []mappedFile
	byPath  map[string]int // files index by path
	index   *indexRef
	owned   [][]byte // AllocHost memory given to ReplaceHost, unmapped at Close
	closed  bool
}

// New returns an empty checkpoint.
func New() *Checkpoint {
	return &Checkpoint{tensors: make(map[string]*Tensor), byPath: make(map[string]int)}
}

// Open opens path, which may be:
//   - a directory: if it holds model.safetensors.index.json, that index is
//     used (every shard it names must exist, and every tensor must live in
//     the shard the index names); otherwise model.safetensors if present;
//     otherwise every *.safetensors file in it, in sorted order. A directory
//     without any of these is an error wrapping ErrNotFound;
//   - a file whose name ends in ".json", read as a safetensors index;
//   - any other file, mapped as a single safetensors file.
//
// Errors for paths that do not exist wrap the os error (errors.Is(err,
// fs.ErrNotExist) holds) and include the path. On error nothing stays
// mapped.
func Open(path string) (*Checkpoint, error) {
	c := New()
	if err := c.AddPath(path); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// AddPath adds what Open would open at path (a directory, an index .json
// or a single file) to c. On error, files of path that were already added
// stay registered; callers that need all-or-nothing use Open.
func (c *Checkpoint) AddPath(path string) error {
	st, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("store: %w", err)
	}
	switch {
	case st.IsDir():
		return c.openDir(path)
	case strings.HasSuffix(strings.ToLower(path), ".json"):
		return c.openIndex(path)
	default:
		return c.AddFile(path)
	}
}

func (c *Checkpoint) openDir(dir string) error {
	idx := filepath.Join(dir, IndexFileName)
	if st, err := os.Stat(idx); err == nil && !st.IsDir() {
		return c.openIndex(idx)
	}
	single := filepath.Join(dir, SingleFileName)
	if st, err := os.Stat(single); err == nil && !st.IsDir() {
		return c.AddFile(single)
	}
	entries, err := os.ReadDir(dir) // sorted by name
	if err != nil {
		return fmt.Errorf("store: %w", err)
	}
	var files []string
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".safetensors") {
			continue
		}
		p := filepath.Join(dir, e.Name())
		if st, err := os.Stat(p); err == nil && !st.IsDir() { // follows symlinks
			files = append(files, p)
		}
	}
	if len(files) == 0 {
		return fmt.Errorf("store: %s: no %s, %s or *.safetensors files: %w", dir, IndexFileName, SingleFileName, ErrNotFound)
	}
	for _, f := range files {
		if err := c.AddFile(f); err != nil {
			return err
		}
	}
	return nil
}

func (c *Checkpoint) openIndex(path string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("store: %w", err)
	}
	idx, err := ParseIndex(b)
	if err != nil {
		return withFile(err, path)
	}
	shards := idx.Shards()
	if len(shards) == 0 {
		return &FormatError{File: path, Msg: "weight_map is empty", err: ErrNotFound}
	}
	dir := filepath.Dir(path)
	for _, s := range shards {
		p := filepath.Join(dir, s)
		st, err := os.Stat(p)
		if err == nil && st.IsDir() {
			err = errors.New("is a directory")
		}
		if err != nil {
			return fmt.Errorf("store: %s: shard %q (holding tensor %q, among others) cannot be opened: %w",
				path, s, idx.TensorsIn(s)[0], err)
		}
	}
	c.mu.Lock()
	c.index = &indexRef{path: path, dir: dir, weightMap: idx.WeightMap}
	c.mu.Unlock()
	for _, s := range shards {
		if err := c.AddFile(filepath.Join(dir, s)); err != nil {
			return err
		}
	}
	names := make([]string, 0, len(idx.WeightMap))
	for n := range idx.WeightMap {
		names = append(names, n)
	}
	sort.Strings(names)
	c.mu.RLock()
	defer c.mu.RUnlock()
	for _, n := range names {
		if _, ok := c.tensors[n]; !ok {
			return &FormatError{File: path, Tensor: n, err: ErrNotFound,
				Msg: fmt.Sprintf("index places it in shard %q, but that shard does not contain it", idx.WeightMap[n])}
		}
	}
	return nil
}

// AddFile memory-maps the safetensors file at path (PROT_READ, MAP_SHARED),
// parses and validates its header (see ParseHeader) and registers its
// tensors. A tensor name that is already registered is an error wrapping
// ErrDuplicate. When the checkpoint was opened through an index, a tensor
// the index assigns to a different shard is an error. On error nothing from
// the file is registered and the mapping is released.
func (c *Checkpoint) AddFile(path string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return ErrClosed
	}
	mf, h, err := mapFile(path)
	if err != nil {
		return err
	}
	data := mf.data
	if err := c.checkNewFile(path, h); err != nil {
		mf.release()
		return err
	}
	for _, ti := range h.Tensors {
		b, e := h.DataStart+ti.Begin, h.DataStart+ti.End
		c.tensors[ti.Name] = &Tensor{Name: ti.Name, DType: ti.DType, Shape: ti.Shape, Source: path, data: data[b:e:e]}
	}
	c.byPath[path] = len(c.files)
	c.files = append(c.files, mf)
	return nil
}

func (c *Checkpoint) checkNewFile(path string, h *Header) error {
	for _, ti := range h.Tensors {
		if old, ok := c.tensors[ti.Name]; ok {
			return &FormatError{File: path, Tensor: ti.Name, err: ErrDuplicate,
				Msg: fmt.Sprintf("duplicate tensor: already loaded from %s", old.Source)}
		}
		if c.index == nil {
			continue
		}
		shard, ok := c.index.weightMap[ti.Name]
		if ok && !samePath(filepath.Join(c.index.dir, shard), path) {
			return &FormatError{File: path, Tensor: ti.Name,
				Msg: fmt.Sprintf("index %s places it in shard %q, but it is in this file", c.index.path, shard)}
		}
	}
	return nil
}

func samePath(a, b string) bool {
	if filepath.Clean(a) == filepath.Clean(b) {
		return true
	}
	aa, err1 := filepath.Abs(a)
	bb, err2 := filepath.Abs(b)
	if err1 == nil && err2 == nil && aa == bb {
		return true
	}
	sa, err1 := os.Stat(a)
	sb, err2 := os.Stat(b)
	return err1 == nil && err2 == nil && os.SameFile(sa, sb)
}

// mapFile maps path read-only, records its identity and parses its
// header. The file stays open (for the identity checks) until release. On
// error nothing stays mapped or open.
func mapFile(path string) (mappedFile, *Header, error) {
	f, id, err := openForMap(path)
	if err != nil {
		return mappedFile{}, nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return mappedFile{}, nil, fmt.Errorf("store: %w", err) // unreachable in practice
	}
	fail := func(err error) (mappedFile, *Header, error) {
		f.Close()
		return mappedFile{}, nil, err
	}
	if st.IsDir() {
		return fail(fmt.Errorf("store: %s: is a directory, not a safetensors file", path))
	}
	if !st.Mode().IsRegular() {
		return fail(fmt.Errorf("store: %s: not a regular file (mode %v)", path, st.Mode()))
	}
	size := id.Size
	if size < 8 {
		return fail(&FormatError{File: path, Msg: fmt.Sprintf("file is %d bytes, too small for a safetensors header (not a safetensors file?)", size)})
	}
	if uint64(size) > math.MaxInt {
		return fail(fmt.Errorf("store: %s: %d bytes is too large to map on this platform", path, size))
	}
	data, err := syscall.Mmap(int(f.Fd()), 0, int(size), syscall.PROT_READ, syscall.MAP_SHARED)
	if err != nil {
		return fail(fmt.Errorf("store: mmap %s: %w", path, err))
	}
	mf := mappedFile{path: path, data: data, fd: f, id: id}
	// The header is read from the mapping: a file truncated between the
	// fstat and here faults, which Guard turns into an error.
	var h *Header
	err = Guard(func() (err error) {
		h, err = ParseHeader(data, size)
		return err
	})
	var fe *FaultError
	if errors.As(err, &fe) {
		if cerr := mf.check(); cerr != nil {
			err = cerr
		}
	}
	if err != nil {
		mf.release()
		return mappedFile{}, nil, withFile(err, path)
	}
	return mf, h, nil
}

// release unmaps the file and closes it.
func (f *mappedFile) release() error {
	var errs []error
	if f.data != nil {
		if err := syscall.Munmap(f.data); err != nil {
			errs = append(errs, fmt.Errorf("store: munmap %s: %w", f.path, err))
		}
		f.data = nil
	}
	if f.fd != nil {
		if err := f.fd.Close(); err != nil {
			errs = append(errs, fmt.Errorf("store: close %s: %w", f.path, err))
		}
		f.fd = nil
	}
	return errors.Join(errs...)
}

func addrOf(b []byte) uintptr { return uintptr(unsafe.Pointer(unsafe.SliceData(b))) }

// AddHost registers a tensor whose bytes live in caller-owned host memory.
// data is not copied and must stay valid and unmodified until Close.
// len(data) must equal product(shape)*dt.Size() bytes; dimensions must be
// non-negative; the name must be non-empty and not yet registered (else an
// error wrapping ErrDuplicate). The tensor's Source is HostSource.
func (c *Checkpoint) AddHost(name string, dt dtype.DType, shape []int64, data []byte) error {
	if err := checkHost(name, dt, shape, data); err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return ErrClosed
	}
	if old, ok := c.tensors[name]; ok {
		return &FormatError{File: HostSource, Tensor: name, err: ErrDuplicate,
			Msg: fmt.Sprintf("duplicate tensor: already loaded from %s", old.Source)}
	}
	c.tensors[name] = &Tensor{
		Name:   name,
		DType:  dt,
		Shape:  append([]int64{}, shape...),
		Source: HostSource,
		data:   data[:len(data):len(data)],
	}
	return nil
}

// checkHost checks a host tensor's name, dtype, shape and byte count.
func checkHost(name string, dt dtype.DType, shape []int64, data []byte) error {
	if name == "" {
		return &FormatError{File: HostSource, Msg: "empty tensor name"}
	}
	if !dt.Valid() {
		return &FormatError{File: HostSource, Tensor: name, Msg: fmt.Sprintf("invalid dtype %s", dt)}
	}
	for _, d := range shape {
		if d < 0 {
			return &FormatError{File: HostSource, Tensor: name, Msg: fmt.Sprintf("negative dimension in shape %v", shape)}
		}
	}
	want, ok := byteSize(shape, dt)
	if !ok {
		return &FormatError{File: HostSource, Tensor: name, Msg: fmt.Sprintf("shape %v of %s overflows int64 bytes", shape, dt)}
	}
	if int64(len(data)) != want {
		return &FormatError{File: HostSource, Tensor: name,
			Msg: fmt.Sprintf("data is %d bytes but shape %v of %s needs %d", len(data), shape, dt, want)}
	}
	return nil
}

// Tensor returns the named tensor, or false if there is none or the
// checkpoint is closed. The result must be treated as read-only.
func (c *Checkpoint) Tensor(name string) (*Tensor, bool) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	t, ok := c.tensors[name]
	return t, ok
}

// Names returns the names of all registered tensors, sorted.
func (c *Checkpoint) Names() []string {
	c.mu.RLock()
	defer c.mu.RUnlock()
	names := make([]string, 0, len(c.tensors))
	for n := range c.tensors {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// Files returns the paths of the mapped files, in the order they were added.
func (c *Checkpoint) Files() []string {
	c.mu.RLock()
	defer c.mu.RUnlock()
	out := make([]string, len(c.files))
	for i, f := range c.files {
		out[i] = f.path
	}
	return out
}

// Close unmaps every file and the memory ReplaceHost took, and forgets
// all tensors; byte slices obtained earlier become invalid (touching a
// file view faults). Caller-owned host memory (AddHost) is not touched.
// The first call returns nil or the munmap errors; every later call (and
// any AddFile, AddHost, ReplaceHost or Experts call) returns ErrClosed.
func (c *Checkpoint) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return ErrClosed
	}
	c.closed = true
	var errs []error
	for i := range c.files {
		errs = append(errs, c.files[i].release())
	}
	c.files = nil
	for _, m := range c.owned {
		errs = append(errs, FreeHost(m))
	}
	c.owned = nil
	c.byPath = map[string]int{}
	c.tensors = map[string]*Tensor{}
	c.index = nil
	return errors.Join(errs...)
}
