package store

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime/debug"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// pagesData is the size of the test file's data section: several pages,
// so that truncating the file leaves whole pages of the mapping past its
// end.
const pagesData = 4 * 4096

// shardHeader is the test file's JSON header; shardSize its size in bytes.
var (
	shardHeader = fmt.Sprintf(`{"t":{"dtype":"U8","shape":[%d],"data_offsets":[0,%d]}}`, pagesData, pagesData)
	shardSize   = int64(8 + len(shardHeader) + pagesData)
)

// writeShard writes a safetensors file with one U8 tensor "t" of pagesData
// bytes (byte i = byte(i)) and backdates its mtime by an hour, so that any
// later write changes it even on filesystems with coarse timestamps.
func writeShard(t *testing.T, path string) {
	t.Helper()
	require.NoError(t, os.WriteFile(path, stBytes(shardHeader, pagesData), 0o644))
	old := time.Now().Add(-time.Hour)
	require.NoError(t, os.Chtimes(path, old, old))
}

// sink keeps reads whose result is otherwise unused from being optimised
// away.
var sink int

// readAll sums every byte of b (a read of each page).
func readAll(b []byte) int {
	s := 0
	for _, v := range b {
		s += int(v)
	}
	return s
}

func TestGuard(t *testing.T) {
	errRead := errors.New("read failed")
	tests := []struct {
		name    string
		read    func() error
		wantErr error // nil: no error
		fault   bool  // want a *FaultError
	}{
		{"no error", func() error { return nil }, nil, false},
		{"read's own error", func() error { return errRead }, errRead, false},
		{"fault on an unmapped page", func() error {
			b, err := syscall.Mmap(-1, 0, 4096, syscall.PROT_READ, syscall.MAP_PRIVATE|syscall.MAP_ANON)
			if err != nil {
				return err
			}
			// PROT_NONE makes the page fault like one past a file's end.
			if err := syscall.Mprotect(b, syscall.PROT_NONE); err != nil {
				return err
			}
			defer syscall.Munmap(b)
			sink = readAll(b)
			return nil
		}, nil, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := Guard(tc.read)
			if tc.fault {
				var fe *FaultError
				require.ErrorAs(t, err, &fe)
				assert.NotZero(t, fe.Addr)
				assert.Contains(t, err.Error(), "memory fault")
				return
			}
			assert.Equal(t, tc.wantErr, err)
		})
	}
}

func TestGuardRestoresSettingAndPassesOtherPanics(t *testing.T) {
	prev := debug.SetPanicOnFault(false)
	defer debug.SetPanicOnFault(prev)
	require.NoError(t, Guard(func() error {
		// Nested guards restore the outer (on) setting.
		require.NoError(t, Guard(func() error { return nil }))
		assert.True(t, debug.SetPanicOnFault(true), "the outer guard's setting is still on")
		return nil
	}))
	assert.False(t, debug.SetPanicOnFault(false), "the setting is restored after Guard")

	var m map[string]int
	assert.PanicsWithError(t, "assignment to entry in nil map", func() {
		_ = Guard(func() error { m["x"]++; return nil })
	}, "a bug is not a fault: it propagates")
}

func TestCheckpointFileChanged(t *testing.T) {
	tests := []struct {
		name    string
		change  func(t *testing.T, path string)
		changed string // substring of the error; "" = no change to report
	}{
		{"untouched", func(t *testing.T, path string) {}, ""},
		{"truncated in place", func(t *testing.T, path string) {
			require.NoError(t, os.Truncate(path, 100))
		}, fmt.Sprintf("(size %d -> 100 bytes)", shardSize)},
		{"rewritten in place, same size", func(t *testing.T, path string) {
			b, err := os.ReadFile(path)
			require.NoError(t, err)
			b[len(b)-1] ^= 0xff
			require.NoError(t, os.WriteFile(path, b, 0o644)) // O_TRUNC, then the same size again
		}, "same size, modified"},
		{"unlinked", func(t *testing.T, path string) {
			require.NoError(t, os.Remove(path))
		}, ""},
		{"replaced by rename", func(t *testing.T, path string) {
			tmp := path + ".new"
			require.NoError(t, os.WriteFile(tmp, []byte("something else entirely"), 0o644))
			require.NoError(t, os.Rename(tmp, path))
		}, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "model.safetensors")
			writeShard(t, path)
			c, err := Open(path)
			require.NoError(t, err)
			defer c.Close()
			tn, ok := c.Tensor("t")
			require.True(t, ok)
			want := readAll(tn.Bytes())
			require.NoError(t, c.CheckFiles(c.Files()))
			assert.Equal(t, shardSize, c.FileIDs()[path].Size)

			tc.change(t, path)

			var got int
			readErr := c.Guard(func() error { got = readAll(tn.Bytes()); return nil })
			checkErr := c.CheckFiles([]string{path, HostSource})
			if tc.changed == "" {
				require.NoError(t, readErr)
				require.NoError(t, checkErr)
				assert.Equal(t, want, got, "the mapping keeps the loaded bytes")
				return
			}
			require.ErrorIs(t, checkErr, ErrCheckpointChanged)
			assert.Contains(t, checkErr.Error(), "checkpoint file "+path+" changed on disk after it was loaded")
			assert.Contains(t, checkErr.Error(), tc.changed)
			assert.Contains(t, checkErr.Error(), "reload the model")
			var ce *ChangedError
			require.ErrorAs(t, checkErr, &ce)
			assert.Equal(t, path, ce.Path)
			if tc.name == "truncated in place" {
				// Reading past the new end faults; the guard names the file.
				require.ErrorIs(t, readErr, ErrCheckpointChanged)
				assert.Equal(t, checkErr.Error(), readErr.Error())
			}
		})
	}
}

func TestExplain(t *testing.T) {
	path := filepath.Join(t.TempDir(), "model.safetensors")
	writeShard(t, path)
	c, err := Open(path)
	require.NoError(t, err)
	defer c.Close()
	tn, _ := c.Tensor("t")
	inside := addrOf(tn.Bytes()) + 10
	other := errors.New("other")
	tests := []struct {
		name  string
		in    error
		check func(t *testing.T, out error)
	}{
		{"nil", nil, func(t *testing.T, out error) { assert.NoError(t, out) }},
		{"not a fault", other, func(t *testing.T, out error) { assert.Equal(t, other, out) }},
		{"fault outside the mappings", &FaultError{Addr: 0x1234}, func(t *testing.T, out error) {
			var fe *FaultError
			assert.ErrorAs(t, out, &fe)
		}},
		{"fault inside, file unchanged: an I/O error", fmt.Errorf("wrapped: %w", &FaultError{Addr: inside}), func(t *testing.T, out error) {
			var pe *fs.PathError
			require.ErrorAs(t, out, &pe)
			assert.Equal(t, path, pe.Path)
			assert.ErrorIs(t, out, syscall.EIO)
			assert.NotErrorIs(t, out, ErrCheckpointChanged)
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) { tc.check(t, c.Explain(tc.in)) })
	}
}

func TestCheckFilesAfterClose(t *testing.T) {
	path := filepath.Join(t.TempDir(), "model.safetensors")
	writeShard(t, path)
	c, err := Open(path)
	require.NoError(t, err)
	require.NoError(t, c.Close())
	assert.ErrorIs(t, c.CheckFiles([]string{path}), ErrClosed)
	assert.Empty(t, c.FileIDs())
}

// BenchmarkCheckFiles is the cost of one file's identity check (one fstat),
// what the engine pays per shard before a layer's reads.
func BenchmarkCheckFiles(b *testing.B) {
	path := filepath.Join(b.TempDir(), "model.safetensors")
	hdr := `{"t":{"dtype":"U8","shape":[16],"data_offsets":[0,16]}}`
	require.NoError(b, os.WriteFile(path, stBytes(hdr, 16), 0o644))
	c, err := Open(path)
	require.NoError(b, err)
	defer c.Close()
	paths := []string{path}
	b.ReportAllocs()
	for b.Loop() {
		if err := c.CheckFiles(paths); err != nil {
			b.Fatal(err)
		}
	}
}
