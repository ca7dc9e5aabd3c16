package trace

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestSaveFile_QuotaExceededIsNoSpace(t *testing.T) {
	path := filepath.Join(t.TempDir(), "eamc.trace")
	require.NoError(t, randomColl(t, 64, 4, 4, 3, 2).SaveFile(path))
	prev, err := os.ReadFile(path)
	require.NoError(t, err)
	fillDiskAfter(t, 50, syscall.EDQUOT)
	checkNoSpace(t, path, prev, syscall.EDQUOT)
}

// TestSaveFile_FullTmpfsKeepsThePreviousTrace fills a real 64 KiB tmpfs.
// Mounting needs root (or CAP_SYS_ADMIN); elsewhere the test is skipped
// and the injected-writer tests cover the same code path.
func TestSaveFile_FullTmpfsKeepsThePreviousTrace(t *testing.T) {
	dir := t.TempDir()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "size=64k"); err != nil {
		t.Skipf("cannot mount a tmpfs on %s (%v): needs root or CAP_SYS_ADMIN", dir, err)
	}
	t.Cleanup(func() { assert.NoError(t, syscall.Unmount(dir, 0)) }) // runs before TempDir's removal
	path := filepath.Join(dir, "eamc.trace")
	first := randomColl(t, 65, 8, 64, 16, 1) // about 2 KiB
	require.NoError(t, first.SaveFile(path))
	prev, err := os.ReadFile(path)
	require.NoError(t, err)

	filler := filepath.Join(dir, "filler")
	f, err := os.Create(filler)
	require.NoError(t, err)
	block := make([]byte, 4096)
	for {
		if _, err := f.Write(block); err != nil {
			require.ErrorIs(t, err, syscall.ENOSPC, "filling the tmpfs")
			break
		}
	}
	require.NoError(t, f.Close())

	big := randomColl(t, 66, 8, 64, 16, 12) // about 24 KiB
	err = big.SaveFile(path)
	require.ErrorIs(t, err, ErrNoSpace)
	require.ErrorIs(t, err, syscall.ENOSPC)
	assert.ErrorContains(t, err, path)
	assert.ErrorContains(t, err, "the previous trace file was kept unchanged")
	raw, err := os.ReadFile(path)
	require.NoError(t, err)
	assert.Equal(t, prev, raw, "the previous trace's bytes are unchanged")
	assert.Equal(t, []string{"eamc.trace", "filler"}, withoutLocks(dirEntries(t, dir)), "no temp file left")

	// Once there is room again the same save succeeds and merges.
	require.NoError(t, os.Remove(filler))
	require.NoError(t, big.SaveFile(path))
	got, err := LoadFile(path)
	require.NoError(t, err)
	assert.Equal(t, 13, got.Len())
}
