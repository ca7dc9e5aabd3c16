package trace

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"math"
	"os"
	"path/filepath"
)

// Trace file format (all integers little-endian):
//
//	offset  size  field
//	0       8     magic "MOEITRC1"
//	8       4     u32 version (= Version)
//	12      4     u32 layers   (>= 1)
//	16      4     u32 experts  (>= 1)
//	20      4     u32 capacity (>= 1)
//	24      4     u32 count    (<= capacity)
//	28      4*N   N = count*layers*experts float32 token counts: EAM 0 row-major, then EAM 1, ...
//	28+4N   4     u32 CRC32 (IEEE) of bytes [0, 28+4N)
//
// capacity*layers*experts must not exceed MaxFloats; counts must be finite
// and non-negative, and no stored EAM may be all-zero.
const (
	// Magic is the 8-byte signature that starts every trace file.
	Magic = "MOEITRC1"
	// Version is the trace file format version written by Save and the only
	// one Load accepts.
	Version uint32 = 1
	// headerSize is the size in bytes of magic plus the five u32 fields.
	headerSize = len(Magic) + 5*4
)

// ErrCorrupt is returned (wrapped) by Load and LoadFile when a trace file is
// truncated, has trailing bytes, a bad magic, invalid dimensions, a CRC
// mismatch or invalid counts.
var ErrCorrupt = errors.New("trace: corrupt trace file")

// ErrUnsupportedVersion is returned (wrapped) by Load and LoadFile when a
// trace file has a format version this package cannot read.
var ErrUnsupportedVersion = errors.New("trace: unsupported trace file version")

// corrupt wraps ErrCorrupt with a description.
func corrupt(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrCorrupt, fmt.Sprintf(format, args...))
}

// Save writes the collection to w in the versioned binary trace format
// described at Magic. It holds a read lock for the duration of the write.
func (c *Collection) Save(w io.Writer) error {
	c.mu.RLock()
	defer c.mu.RUnlock()

	crc := crc32.NewIEEE()
	bw := bufio.NewWriterSize(io.MultiWriter(w, crc), 64<<10)
	var hdr [headerSize]byte
	copy(hdr[:], Magic)
	binary.LittleEndian.PutUint32(hdr[8:], Version)
	binary.LittleEndian.PutUint32(hdr[12:], uint32(c.layers))
	binary.LittleEndian.PutUint32(hdr[16:], uint32(c.experts))
	binary.LittleEndian.PutUint32(hdr[20:], uint32(c.capacity))
	binary.LittleEndian.PutUint32(hdr[24:], uint32(len(c.entries)))
	_, _ = bw.Write(hdr[:]) // fits the buffer; bufio errors are sticky and surface below
	var b [4]byte
	for _, e := range c.entries {
		for _, v := range e.m.Counts {
			binary.LittleEndian.PutUint32(b[:], math.Float32bits(v))
			if _, err := bw.Write(b[:]); err != nil {
				return fmt.Errorf("trace: write counts: %w", err)
			}
		}
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("trace: write counts: %w", err)
	}
	binary.LittleEndian.PutUint32(b[:], crc.Sum32())
	if _, err := w.Write(b[:]); err != nil {
		return fmt.Errorf("trace: write checksum: %w", err)
	}
	return nil
}

// readChunk is the number of bytes Load reads at a time; allocation grows
// with the bytes actually present, not with the sizes a header claims.
const readChunk = 64 << 10

// readFull reads exactly len(p) bytes into p, mapping a short read to an
// ErrCorrupt error naming what was being read (whatf and args, formatted only
// on error).
func readFull(r io.Reader, p []byte, whatf string, args ...any) error {
	if _, err := io.ReadFull(r, p); err != nil {
		what := fmt.Sprintf(whatf, args...)
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return fmt.Errorf("%w: truncated %s: %w", ErrCorrupt, what, io.ErrUnexpectedEOF)
		}
		return fmt.Errorf("trace: read %s: %w", what, err)
	}
	return nil
}

// Load reads a collection written by Save. It validates the magic, the
// version (only Version is supported; others give ErrUnsupportedVersion),
// the dimensions (all >= 1, capacity*layers*experts <= MaxFloats, count <=
// capacity), the exact length, the CRC and every count (finite,
// non-negative, no all-zero EAM). Problems with the content wrap ErrCorrupt;
// errors of r itself are returned wrapped as they are.
func Load(r io.Reader) (*Collection, error) {
	crc := crc32.NewIEEE()
	tr := io.TeeReader(r, crc)

	var hdr [headerSize]byte
	if err := readFull(tr, hdr[:len(Magic)], "magic"); err != nil {
		return nil, err
	}
	if string(hdr[:len(Magic)]) != Magic {
		return nil, corrupt("bad magic %q, want %q", hdr[:len(Magic)], Magic)
	}
	if err := readFull(tr, hdr[len(Magic):len(Magic)+4], "version"); err != nil {
		return nil, err
	}
	if v := binary.LittleEndian.Uint32(hdr[8:]); v != Version {
		return nil, fmt.Errorf("%w: file has version %d, supported versions: %d", ErrUnsupportedVersion, v, Version)
	}
	if err := readFull(tr, hdr[12:], "header"); err != nil {
		return nil, err
	}
	layers := binary.LittleEndian.Uint32(hdr[12:])
	experts := binary.LittleEndian.Uint32(hdr[16:])
	capacity := binary.LittleEndian.Uint32(hdr[20:])
	count := binary.LittleEndian.Uint32(hdr[24:])
	// Validate in uint64 so that no product can overflow (each factor < 2^32
	// and each product is checked against MaxFloats before the next).
	switch {
	case layers == 0 || experts == 0 || capacity == 0:
		return nil, corrupt("invalid dimensions %d layers x %d experts, capacity %d: all must be >= 1",
			layers, experts, capacity)
	case uint64(layers)*uint64(experts) > MaxFloats ||
		uint64(layers)*uint64(experts)*uint64(capacity) > MaxFloats:
		return nil, corrupt("%d layers x %d experts x capacity %d exceeds %d floats",
			layers, experts, capacity, MaxFloats)
	case count > capacity:
		return nil, corrupt("count %d exceeds capacity %d", count, capacity)
	}
	c, err := NewCollection(int(layers), int(experts), int(capacity))
	if err != nil { // unreachable after the checks above; kept for safety
		return nil, corrupt("%v", err)
	}

	// Read payload EAM by EAM, growing buffers only as bytes arrive.
	per := int(layers) * int(experts)
	ms := make([]*EAM, 0, min(int(count), readChunk))
	buf := make([]byte, readChunk)
	for i := 0; i < int(count); i++ {
		counts := make([]float32, 0, min(per, readChunk/4))
		for len(counts) < per {
			n := min(per-len(counts), readChunk/4)
			if err := readFull(tr, buf[:4*n], "counts of EAM %d of %d", i, count); err != nil {
				return nil, err
			}
			for j := range n {
				counts = append(counts, math.Float32frombits(binary.LittleEndian.Uint32(buf[4*j:])))
			}
		}
		if cap(counts) != per {
			counts = append([]float32(nil), counts...)
		}
		ms = append(ms, &EAM{Layers: int(layers), Experts: int(experts), Counts: counts})
	}

	want := crc.Sum32()
	var tail [4]byte
	if err := readFull(r, tail[:], "checksum"); err != nil {
		return nil, err
	}
	if got := binary.LittleEndian.Uint32(tail[:]); got != want {
		return nil, corrupt("CRC mismatch: file says %#08x, content has %#08x", got, want)
	}
	var extra [1]byte
	switch n, err := io.ReadFull(r, extra[:]); {
	case n > 0:
		return nil, corrupt("trailing data after checksum")
	case err != nil && !errors.Is(err, io.EOF):
		return nil, fmt.Errorf("trace: read after checksum: %w", err)
	}

	for i, m := range ms {
		if err := m.validate(c.layers, c.experts); err != nil {
			return nil, corrupt("EAM %d: %v", i, err)
		}
		if m.isZero() {
			return nil, corrupt("EAM %d is all-zero", i)
		}
		c.entries = append(c.entries, entry{m: m, pn: prefixSqNorms(m)})
	}
	return c, nil
}

// ErrNoSpace is returned (wrapped, together with the underlying system
// error) by SaveFile when the filesystem holding the trace file is full (no
// space left on the device, or the disk quota is exhausted). The previous
// trace file is then left as it was.
var ErrNoSpace = errors.New("trace: disk full (no space left on device)")

// createTemp, tempWriter and syncFile are indirections so tests can
// simulate failures of the individual steps of SaveFile (tempWriter: the
// writer that the file's bytes go through, for instance one that runs out
// of space partway).
var (
	createTemp = os.CreateTemp
	tempWriter = func(f *os.File) io.Writer { return f }
	syncFile   = (*os.File).Sync
)

// SaveFile writes the collection to the trace file at path, merged with
// what the file holds now, so that processes sharing one trace file lose no
// EAMs (up to capacity):
//
//  1. It takes an exclusive advisory lock on path + ".lock" (created if
//     needed, mode 0644, never removed), waiting for other savers.
//  2. It loads the trace file at path, if any. A file that is corrupt, of
//     an unsupported version or of another shape is replaced; another read
//     error fails the save.
//  3. It builds the merged collection (see merge.go): the file's EAMs, then
//     this collection's EAMs that are new since it last loaded or saved
//     this file, each added under Add's replacement rule, with this
//     collection's capacity.
//  4. It writes the result to a temporary file in the same directory,
//     fsyncs it, renames it over path, fsyncs the directory (best effort)
//     and releases the lock.
//
// The collection in memory is not changed, except that it records which
// EAMs the file now holds. On any error the file at path is untouched and
// the temporary file is removed; a full filesystem gives an error wrapping
// ErrNoSpace that names path. The new file has mode 0644. Without flock
// (platforms other than Linux, macOS and the BSDs) step 1 is skipped.
func (c *Collection) SaveFile(path string) (err error) {
	existed := false
	defer func() {
		if err != nil && isNoSpace(err) {
			kept := "the previous trace file was kept unchanged"
			if !existed {
				kept = "no trace file was written (there was none before)"
			}
			cause := err // the system error itself reads best: "write FILE: no space left on device"
			var pe *fs.PathError
			if errors.As(err, &pe) {
				cause = pe
			}
			err = fmt.Errorf("%w: cannot save the trace to %s; %s (%w)", ErrNoSpace, path, kept, cause)
		}
	}()
	if _, serr := os.Lstat(path); serr == nil {
		existed = true
	}
	unlock, err := lockFile(path + ".lock")
	if err != nil {
		return fmt.Errorf("trace: save %s: %w", path, err)
	}
	defer unlock()

	disk, existed, err := c.readCurrent(path)
	if err != nil {
		return fmt.Errorf("trace: save %s: read the current trace file: %w", path, err)
	}
	key := syncKey(path)
	mine, synced := c.snapshotForSave(key)
	out, err := merge(disk, mine, synced, c.layers, c.experts, c.capacity)
	if err != nil {
		return fmt.Errorf("trace: save %s: %w", path, err)
	}
	if err = out.writeFile(path); err != nil {
		return err
	}
	c.markSynced(key, idCounts(mine))
	return nil
}

// readCurrent returns the entries of the trace file at path that SaveFile
// merges with: nil when there is no file or it cannot be used (corrupt, of
// an unsupported version or of another shape than c). exists reports
// whether a file was there. Other errors (the file cannot be read) are
// returned.
func (c *Collection) readCurrent(path string) (es []entry, exists bool, err error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, false, nil
	}
	if err != nil {
		return nil, true, err
	}
	defer f.Close()
	disk, err := Load(bufio.NewReaderSize(f, readChunk))
	switch {
	case errors.Is(err, ErrCorrupt), errors.Is(err, ErrUnsupportedVersion):
		return nil, true, nil
	case err != nil:
		return nil, true, err
	case disk.CheckShape(c.layers, c.experts) != nil:
		return nil, true, nil
	}
	return disk.entries, true, nil
}

// writeFile writes c to path atomically: a temporary file in the same
// directory, fsynced, renamed over path, then the directory fsynced (best
// effort). On error the file at path is untouched and the temporary file is
// removed.
func (c *Collection) writeFile(path string) (err error) {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	f, err := createTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return fmt.Errorf("trace: save %s: %w", path, err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			_ = f.Close()
			_ = os.Remove(tmp)
		}
	}()
	if err = c.Save(tempWriter(f)); err != nil {
		return fmt.Errorf("trace: save %s: %w", path, err)
	}
	if err = f.Chmod(0o644); err != nil {
		return fmt.Errorf("trace: save %s: %w", path, err)
	}
	if err = syncFile(f); err != nil {
		return fmt.Errorf("trace: save %s: sync: %w", path, err)
	}
	if err = f.Close(); err != nil {
		return fmt.Errorf("trace: save %s: close: %w", path, err)
	}
	if err = os.Rename(tmp, path); err != nil {
		return fmt.Errorf("trace: save %s: %w", path, err)
	}
	if d, derr := os.Open(dir); derr == nil {
		_ = d.Sync() // best effort: persist the rename
		_ = d.Close()
	}
	return nil
}

// LoadFile reads a collection from the trace file at path (see Load). The
// collection records that its EAMs came from path, so that SaveFile to the
// same path does not count them twice (see SaveFile).
func LoadFile(path string) (*Collection, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("trace: load: %w", err)
	}
	defer f.Close()
	c, err := Load(bufio.NewReaderSize(f, readChunk))
	if err != nil {
		return nil, fmt.Errorf("trace: load %s: %w", path, err)
	}
	c.markSynced(syncKey(path), idCounts(c.entries))
	return c, nil
}
