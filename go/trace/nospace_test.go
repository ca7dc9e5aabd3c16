package trace

import (
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// fullDisk is a writer that accepts room bytes and then fails as a file on a
// full filesystem does: a short write and a *fs.PathError wrapping errno.
type fullDisk struct {
	f     *os.File
	room  int
	errno syscall.Errno
}

func (w *fullDisk) Write(p []byte) (int, error) {
	n := min(len(p), w.room)
	n, err := w.f.Write(p[:n])
	w.room -= n
	if err == nil && n < len(p) {
		err = &fs.PathError{Op: "write", Path: w.f.Name(), Err: w.errno}
	}
	return n, err
}

// fillDiskAfter makes SaveFile's writes fail with errno after room bytes
// for the rest of the test.
func fillDiskAfter(t *testing.T, room int, errno syscall.Errno) {
	tempWriter = func(f *os.File) io.Writer { return &fullDisk{f: f, room: room, errno: errno} }
	t.Cleanup(func() { tempWriter = func(f *os.File) io.Writer { return f } })
}

// checkNoSpace saves next to path (which holds prev's bytes, or nothing
// when prev is nil) with the disk already made full by the caller, and
// asserts the ErrNoSpace contract.
func checkNoSpace(t *testing.T, path string, prev []byte, errno syscall.Errno) {
	t.Helper()
	next := randomColl(t, 62, 4, 4, 3, 3)
	err := next.SaveFile(path)

	require.ErrorIs(t, err, ErrNoSpace)
	require.ErrorIs(t, err, errno, "the system error is kept")
	assert.NotErrorIs(t, err, ErrCorrupt)
	assert.ErrorContains(t, err, "disk full")
	assert.ErrorContains(t, err, path)
	if prev != nil {
		assert.ErrorContains(t, err, "the previous trace file was kept unchanged")
		raw, rerr := os.ReadFile(path)
		require.NoError(t, rerr)
		assert.Equal(t, prev, raw, "the previous trace's bytes are unchanged")
		assert.Equal(t, []string{filepath.Base(path)}, withoutLocks(dirEntries(t, filepath.Dir(path))), "no temp file left")
	} else {
		assert.ErrorContains(t, err, "no trace file was written")
		assert.Empty(t, withoutLocks(dirEntries(t, filepath.Dir(path))), "no trace or temp file left")
	}
}

func TestSaveFile_FullDiskKeepsThePreviousTrace(t *testing.T) {
	enospc := func(op, path string) error { return &fs.PathError{Op: op, Path: path, Err: syscall.ENOSPC} }
	tests := []struct {
		name     string
		previous bool
		full     func(t *testing.T) // makes the disk "full"
	}{
		{"write fails partway", true, func(t *testing.T) { fillDiskAfter(t, 100, syscall.ENOSPC) }},
		{"first write fails", true, func(t *testing.T) { fillDiskAfter(t, 0, syscall.ENOSPC) }},
		{"write fails partway, no previous trace", false, func(t *testing.T) { fillDiskAfter(t, 100, syscall.ENOSPC) }},
		{"sync fails (delayed allocation)", true, func(t *testing.T) {
			syncFile = func(f *os.File) error { return enospc("sync", f.Name()) }
			t.Cleanup(func() { syncFile = (*os.File).Sync })
		}},
		{"temp file cannot be created", true, func(t *testing.T) {
			createTemp = func(dir, pattern string) (*os.File, error) { return nil, enospc("open", filepath.Join(dir, pattern)) }
			t.Cleanup(func() { createTemp = os.CreateTemp })
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "eamc.trace")
			var prev []byte
			if tc.previous {
				require.NoError(t, randomColl(t, 61, 4, 4, 3, 2).SaveFile(path))
				var err error
				prev, err = os.ReadFile(path)
				require.NoError(t, err)
			}
			tc.full(t)
			checkNoSpace(t, path, prev, syscall.ENOSPC)
		})
	}
}

func TestSaveFile_OtherWriteErrorsAreNotNoSpace(t *testing.T) {
	path := filepath.Join(t.TempDir(), "eamc.trace")
	fillDiskAfter(t, 10, syscall.EIO)
	err := randomColl(t, 63, 2, 2, 2, 2).SaveFile(path)
	require.ErrorIs(t, err, syscall.EIO)
	assert.False(t, errors.Is(err, ErrNoSpace))
	assert.NotContains(t, err.Error(), "disk full")
}
