package trace

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"io"
	"io/fs"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"testing/iotest"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// randomColl returns a collection of layers x experts with the given
// capacity and n (possibly > capacity, exercising replacement) random
// non-zero EAMs added.
func randomColl(t testing.TB, seed uint64, layers, experts, capacity, n int) *Collection {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, seed+1))
	c, err := NewCollection(layers, experts, capacity)
	require.NoError(t, err)
	for range n {
		m := NewEAM(layers, experts)
		for i := range m.Counts {
			if rng.IntN(3) == 0 {
				m.Counts[i] = float32(rng.IntN(50)) + rng.Float32()
			}
		}
		m.Counts[rng.IntN(len(m.Counts))] += 1
		require.NoError(t, c.Add(m))
	}
	return c
}

// saved returns c serialised with Save.
func saved(t testing.TB, c *Collection) []byte {
	t.Helper()
	var buf bytes.Buffer
	require.NoError(t, c.Save(&buf))
	return buf.Bytes()
}

// fixCRC rewrites the trailing CRC of a trace file image to match its body.
func fixCRC(b []byte) []byte {
	body := b[:len(b)-4]
	binary.LittleEndian.PutUint32(b[len(b)-4:], crc32.ChecksumIEEE(body))
	return b
}

func TestSave_WritesDocumentedLayout(t *testing.T) {
	c := collOf(t, 5, eamOf([]float32{1, 2, 3}, []float32{4, 5, 6}), eamOf([]float32{0, 0.5, 0}, []float32{7, 0, 0}))
	b := saved(t, c)
	require.Len(t, b, headerSize+2*6*4+4)
	assert.Equal(t, Magic, string(b[:8]))
	le := binary.LittleEndian
	assert.Equal(t, Version, le.Uint32(b[8:]))
	assert.Equal(t, uint32(2), le.Uint32(b[12:]), "layers")
	assert.Equal(t, uint32(3), le.Uint32(b[16:]), "experts")
	assert.Equal(t, uint32(5), le.Uint32(b[20:]), "capacity")
	assert.Equal(t, uint32(2), le.Uint32(b[24:]), "count")
	assert.Equal(t, float32(1), math.Float32frombits(le.Uint32(b[28:])))
	assert.Equal(t, float32(6), math.Float32frombits(le.Uint32(b[28+5*4:])))
	assert.Equal(t, float32(0.5), math.Float32frombits(le.Uint32(b[28+7*4:])))
	assert.Equal(t, crc32.ChecksumIEEE(b[:len(b)-4]), le.Uint32(b[len(b)-4:]))
}

func TestSaveLoad_RoundTripIsByteIdentical(t *testing.T) {
	tests := []struct {
		name                         string
		layers, experts, capacity, n int
	}{
		{"empty", 3, 4, 7, 0},
		{"partly full", 4, 8, 10, 6},
		{"full after replacement", 5, 3, 6, 40},
		{"mixtral shape", 32, 8, 50, 60},
		{"large rows beyond read chunk", 48, 512, 2, 2},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := randomColl(t, 7, tc.layers, tc.experts, tc.capacity, tc.n)
			b := saved(t, c)
			got, err := Load(bytes.NewReader(b))
			require.NoError(t, err)
			assert.Equal(t, tc.layers, got.Layers())
			assert.Equal(t, tc.experts, got.Experts())
			assert.Equal(t, tc.capacity, got.Capacity())
			assert.Equal(t, c.Len(), got.Len())
			assert.Equal(t, c.Snapshot(), got.Snapshot())
			assert.Equal(t, b, saved(t, got), "re-save must reproduce the bytes")

			// The loaded collection behaves like the original.
			if c.Len() > 0 {
				q := c.Snapshot()[0]
				assert.Equal(t, c.Match(q, 1, 3), got.Match(q, 1, 3))
				assert.Equal(t, c.Predict(q, 0, 3), got.Predict(q, 0, 3))
			}
		})
	}
}

func TestLoad_RejectsCorruptFiles(t *testing.T) {
	valid := saved(t, collOf(t, 3, eamOf([]float32{1, 2}, []float32{3, 4}), eamOf([]float32{0, 1}, []float32{1, 0})))
	le := binary.LittleEndian
	// mut returns a copy of valid with f applied.
	mut := func(f func(b []byte) []byte) []byte {
		return f(append([]byte(nil), valid...))
	}
	setU32 := func(off int, v uint32, fix bool) []byte {
		return mut(func(b []byte) []byte {
			le.PutUint32(b[off:], v)
			if fix {
				fixCRC(b)
			}
			return b
		})
	}
	setF32 := func(idx int, v float32) []byte {
		return setU32(headerSize+4*idx, math.Float32bits(v), true)
	}
	tests := []struct {
		name    string
		data    []byte
		wantErr error
		wantMsg string
	}{
		{"empty", nil, ErrCorrupt, "truncated magic"},
		{"short magic", valid[:5], ErrCorrupt, "truncated magic"},
		{"bad magic", mut(func(b []byte) []byte { b[0] = 'X'; return b }), ErrCorrupt, "bad magic"},
		{"truncated version", valid[:10], ErrCorrupt, "truncated version"},
		{"future version", setU32(8, 2, true), ErrUnsupportedVersion, "file has version 2, supported versions: 1"},
		{"version zero", setU32(8, 0, true), ErrUnsupportedVersion, "version 0"},
		{"truncated header", valid[:20], ErrCorrupt, "truncated header"},
		{"zero layers", setU32(12, 0, true), ErrCorrupt, "0 layers"},
		{"zero experts", setU32(16, 0, true), ErrCorrupt, "0 experts"},
		{"zero capacity", setU32(20, 0, true), ErrCorrupt, "capacity 0"},
		{"absurd capacity", setU32(20, 1<<27, true), ErrCorrupt, "exceeds"},
		{"absurd row size", mut(func(b []byte) []byte {
			le.PutUint32(b[12:], 1<<16)
			le.PutUint32(b[16:], 1<<16)
			return fixCRC(b)
		}), ErrCorrupt, "exceeds"},
		{"overflowing dimensions", mut(func(b []byte) []byte {
			for off := 12; off < 28; off += 4 {
				le.PutUint32(b[off:], math.MaxUint32)
			}
			return fixCRC(b)
		}), ErrCorrupt, "exceeds"},
		{"count above capacity", setU32(24, 4, true), ErrCorrupt, "count 4 exceeds capacity 3"},
		{"count claims more EAMs", setU32(24, 3, true), ErrCorrupt, "truncated"},
		{"truncated payload", valid[:headerSize+10], ErrCorrupt, "truncated counts of EAM 0"},
		{"truncated second EAM", valid[:headerSize+20], ErrCorrupt, "truncated counts of EAM 1"},
		{"missing checksum", valid[:len(valid)-4], ErrCorrupt, "truncated checksum"},
		{"truncated checksum", valid[:len(valid)-2], ErrCorrupt, "truncated checksum"},
		{"bad checksum", mut(func(b []byte) []byte { b[len(b)-1] ^= 0xff; return b }), ErrCorrupt, "CRC mismatch"},
		{"flipped payload bit", mut(func(b []byte) []byte { b[headerSize+1] ^= 0x01; return b }), ErrCorrupt, "CRC mismatch"},
		{"header changed without CRC fix", setU32(20, 9, false), ErrCorrupt, "CRC mismatch"},
		{"trailing data", append(append([]byte(nil), valid...), 0), ErrCorrupt, "trailing data"},
		{"NaN count", setF32(1, float32(math.NaN())), ErrCorrupt, "EAM 0"},
		{"+Inf count", setF32(5, float32(math.Inf(1))), ErrCorrupt, "EAM 1"},
		{"-Inf count", setF32(2, float32(math.Inf(-1))), ErrCorrupt, "layer 1, expert 0"},
		{"negative count", setF32(7, -1), ErrCorrupt, "layer 1, expert 1"},
		{"all-zero EAM", mut(func(b []byte) []byte {
			clear(b[headerSize+16 : headerSize+32])
			return fixCRC(b)
		}), ErrCorrupt, "EAM 1 is all-zero"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c, err := Load(bytes.NewReader(tc.data))
			require.Error(t, err)
			assert.Nil(t, c)
			assert.ErrorIs(t, err, tc.wantErr)
			assert.ErrorContains(t, err, tc.wantMsg)
			if tc.wantErr == ErrCorrupt {
				assert.NotErrorIs(t, err, ErrUnsupportedVersion)
			} else {
				assert.NotErrorIs(t, err, ErrCorrupt)
			}
		})
	}
}

func TestLoad_TruncationWrapsUnexpectedEOF(t *testing.T) {
	valid := saved(t, collOf(t, 1, eamOf([]float32{1})))
	for n := range len(valid) {
		_, err := Load(bytes.NewReader(valid[:n]))
		require.ErrorIs(t, err, ErrCorrupt, "length %d", n)
		assert.ErrorIs(t, err, io.ErrUnexpectedEOF, "length %d", n)
	}
}

func TestLoad_PropagatesReaderErrors(t *testing.T) {
	boom := errors.New("disk on fire")
	valid := saved(t, collOf(t, 1, eamOf([]float32{1})))
	tests := []struct {
		name string
		r    io.Reader
	}{
		{"immediately", iotest.ErrReader(boom)},
		{"mid payload", io.MultiReader(bytes.NewReader(valid[:headerSize+2]), iotest.ErrReader(boom))},
		{"after checksum", io.MultiReader(bytes.NewReader(valid), iotest.ErrReader(boom))},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Load(tc.r)
			require.ErrorIs(t, err, boom)
			assert.NotErrorIs(t, err, ErrCorrupt)
		})
	}
}

// failWriter accepts n bytes and then fails every write.
type failWriter struct {
	n   int
	err error
}

func (w *failWriter) Write(p []byte) (int, error) {
	if len(p) <= w.n {
		w.n -= len(p)
		return len(p), nil
	}
	k := w.n
	w.n = 0
	return k, w.err
}

func TestSave_PropagatesWriterErrors(t *testing.T) {
	boom := errors.New("pipe closed")
	small := collOf(t, 1, eamOf([]float32{1, 2}))
	big := randomColl(t, 3, 64, 512, 1, 1) // payload larger than the write buffer
	smallLen := len(saved(t, small))
	tests := []struct {
		name    string
		c       *Collection
		accept  int
		wantMsg string
	}{
		{"header", small, 0, "write counts"},
		{"counts while buffering", big, 0, "write counts"},
		{"checksum", small, smallLen - 4, "write checksum"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.c.Save(&failWriter{n: tc.accept, err: boom})
			require.ErrorIs(t, err, boom)
			assert.ErrorContains(t, err, tc.wantMsg)
		})
	}
}

// withoutLocks returns names without the lock files SaveFile leaves
// beside trace files (by design: see lockFile).
func withoutLocks(names []string) []string {
	return slices.DeleteFunc(slices.Clone(names), func(n string) bool { return strings.HasSuffix(n, ".lock") })
}

// dirEntries returns the names in dir.
func dirEntries(t *testing.T, dir string) []string {
	t.Helper()
	es, err := os.ReadDir(dir)
	require.NoError(t, err)
	names := make([]string, len(es))
	for i, e := range es {
		names[i] = e.Name()
	}
	return names
}

func TestSaveFile_WritesAtomicallyAndLoads(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "eamc.trace")
	c1 := randomColl(t, 11, 8, 4, 5, 9)
	require.NoError(t, c1.SaveFile(path))
	raw, err := os.ReadFile(path)
	require.NoError(t, err)
	assert.Equal(t, saved(t, c1), raw, "a new file holds exactly the collection")

	// A second collection saved to the same file merges with it: the
	// file's EAMs first, then its own, under the replacement rule.
	c2 := randomColl(t, 12, 8, 4, 5, 3)
	require.NoError(t, c2.SaveFile(path), "saving over an existing file")
	want := collOf(t, 5, append(c1.Snapshot(), c2.Snapshot()...)...)

	assert.Equal(t, []string{"eamc.trace", "eamc.trace.lock"}, dirEntries(t, dir), "no temp files left")
	info, err := os.Stat(path)
	require.NoError(t, err)
	assert.Equal(t, fs.FileMode(0o644), info.Mode().Perm())

	got, err := LoadFile(path)
	require.NoError(t, err)
	assert.Equal(t, want.Snapshot(), got.Snapshot())
	raw, err = os.ReadFile(path)
	require.NoError(t, err)
	assert.Equal(t, saved(t, want), raw)
}

func TestSaveFile_RelativePathUsesWorkingDirectory(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	c := randomColl(t, 13, 2, 2, 2, 2)
	require.NoError(t, c.SaveFile("rel.trace"))
	got, err := LoadFile(filepath.Join(dir, "rel.trace"))
	require.NoError(t, err)
	assert.Equal(t, c.Snapshot(), got.Snapshot())
}

func TestSaveFile_FailureLeavesOriginalUntouched(t *testing.T) {
	orig := randomColl(t, 21, 4, 4, 3, 3)
	next := randomColl(t, 22, 4, 4, 3, 3)
	boom := errors.New("injected")
	tests := []struct {
		name  string
		setup func(t *testing.T, dir string) // may install hooks
		path  func(dir string) string
	}{
		{
			name: "sync fails",
			setup: func(t *testing.T, _ string) {
				syncFile = func(*os.File) error { return boom }
				t.Cleanup(func() { syncFile = (*os.File).Sync })
			},
		},
		{
			name: "write fails",
			setup: func(t *testing.T, _ string) {
				// Hand SaveFile a read-only handle so every write fails.
				createTemp = func(dir, pattern string) (*os.File, error) {
					f, err := os.CreateTemp(dir, pattern)
					if err != nil {
						return nil, err
					}
					name := f.Name()
					_ = f.Close()
					return os.Open(name)
				}
				t.Cleanup(func() { createTemp = os.CreateTemp })
			},
		},
		{
			name: "temp creation fails",
			setup: func(t *testing.T, _ string) {
				createTemp = func(string, string) (*os.File, error) { return nil, boom }
				t.Cleanup(func() { createTemp = os.CreateTemp })
			},
		},
		{
			name: "rename onto a directory fails",
			setup: func(t *testing.T, dir string) {
				require.NoError(t, os.Mkdir(filepath.Join(dir, "target"), 0o755))
				require.NoError(t, os.WriteFile(filepath.Join(dir, "target", "keep"), []byte("x"), 0o644))
			},
			path: func(dir string) string { return filepath.Join(dir, "target") },
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "eamc.trace")
			if tc.path != nil {
				path = tc.path(dir)
			} else {
				require.NoError(t, orig.SaveFile(path))
			}
			var origBytes []byte
			if tc.path == nil {
				var err error
				origBytes, err = os.ReadFile(path)
				require.NoError(t, err)
			}
			tc.setup(t, dir)
			before := dirEntries(t, dir)

			require.Error(t, next.SaveFile(path))

			assert.Equal(t, withoutLocks(before), withoutLocks(dirEntries(t, dir)), "temp file must be removed")
			if tc.path == nil {
				raw, err := os.ReadFile(path)
				require.NoError(t, err)
				assert.Equal(t, origBytes, raw, "original must be untouched")
			}
		})
	}
}

func TestSaveFile_ReadOnlyDirectoryFailsCleanly(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "eamc.trace")
	orig := randomColl(t, 31, 3, 3, 2, 2)
	require.NoError(t, orig.SaveFile(path))
	origBytes, err := os.ReadFile(path)
	require.NoError(t, err)
	require.NoError(t, os.Chmod(dir, 0o555))
	t.Cleanup(func() { _ = os.Chmod(dir, 0o755) })
	if f, err := os.CreateTemp(dir, "probe"); err == nil {
		_ = f.Close()
		_ = os.Remove(f.Name())
		t.Skip("permission bits are not enforced for this user (e.g. root)")
	}

	err = randomColl(t, 32, 3, 3, 2, 2).SaveFile(path)
	require.ErrorIs(t, err, fs.ErrPermission)
	assert.Equal(t, []string{"eamc.trace", "eamc.trace.lock"}, dirEntries(t, dir))
	raw, err := os.ReadFile(path)
	require.NoError(t, err)
	assert.Equal(t, origBytes, raw)
}

func TestSaveFile_MissingDirectoryFails(t *testing.T) {
	c := randomColl(t, 41, 2, 2, 1, 1)
	err := c.SaveFile(filepath.Join(t.TempDir(), "nope", "eamc.trace"))
	require.ErrorIs(t, err, fs.ErrNotExist)
}

func TestLoadFile_ReportsMissingAndCorruptFiles(t *testing.T) {
	dir := t.TempDir()
	_, err := LoadFile(filepath.Join(dir, "missing.trace"))
	require.ErrorIs(t, err, fs.ErrNotExist)

	bad := filepath.Join(dir, "bad.trace")
	require.NoError(t, os.WriteFile(bad, []byte("MOEITRC0garbage"), 0o644))
	_, err = LoadFile(bad)
	require.ErrorIs(t, err, ErrCorrupt)
	assert.ErrorContains(t, err, bad)
}
