package trace

import (
	"errors"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// rowsOf returns the single-layer EAMs with the given rows.
func rowsOf(rows [][]float32) []*EAM {
	ms := make([]*EAM, len(rows))
	for i, r := range rows {
		ms[i] = eamOf(r)
	}
	return ms
}

// countsOf returns the counts of the EAMs of the trace file at path.
func countsOf(t *testing.T, path string) [][]float32 {
	t.Helper()
	c, err := LoadFile(path)
	require.NoError(t, err)
	var out [][]float32
	for _, m := range c.Snapshot() {
		out = append(out, m.Counts)
	}
	return out
}

// loadLikeEngine returns the collection a process starts with: the file's
// EAMs resized to capacity (as the engine does), or an empty collection
// when there is no file.
func loadLikeEngine(t *testing.T, path string, layers, experts, capacity int) *Collection {
	t.Helper()
	c, err := LoadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		c, err = NewCollection(layers, experts, capacity)
		require.NoError(t, err)
		return c
	}
	require.NoError(t, err)
	c, err = c.WithCapacity(capacity)
	require.NoError(t, err)
	return c
}

func TestSaveFile_MergesWithTheFileOnDisk(t *testing.T) {
	a := []float32{1, 0, 0}
	b := []float32{0, 1, 0}
	d := []float32{0, 0, 1}
	tests := []struct {
		name     string
		capacity int
		file     [][]float32 // the file before this process starts; nil: none
		load     bool        // this process loaded the file at start
		other    [][]float32 // EAMs another process (which loaded the file too) saved meanwhile
		added    [][]float32 // EAMs this process recorded
		want     [][]float32 // the file afterwards
	}{
		{name: "new file holds the collection", capacity: 4, added: [][]float32{a, b}, want: [][]float32{a, b}},
		{name: "loaded EAMs saved back are not doubled", capacity: 4, file: [][]float32{a, b}, load: true,
			added: [][]float32{d}, want: [][]float32{a, b, d}},
		{name: "nothing new leaves the file as it was", capacity: 4, file: [][]float32{a, b}, load: true,
			want: [][]float32{a, b}},
		{name: "without a load every EAM is new", capacity: 4, file: [][]float32{a}, added: [][]float32{a, b},
			want: [][]float32{a, a, b}},
		{name: "identical new EAM beside a loaded one is kept", capacity: 4, file: [][]float32{a}, load: true,
			added: [][]float32{a, a}, want: [][]float32{a, a, a}},
		{name: "another process's EAMs are kept", capacity: 4, file: [][]float32{a}, load: true,
			other: [][]float32{b}, added: [][]float32{d}, want: [][]float32{a, b, d}},
		{name: "both processes add the same EAM", capacity: 4, file: [][]float32{a}, load: true,
			other: [][]float32{b}, added: [][]float32{b}, want: [][]float32{a, b, b}},
		{name: "full: a new EAM replaces the most similar on disk", capacity: 3, file: [][]float32{a, b, d}, load: true,
			added: [][]float32{{0.1, 1, 0}}, want: [][]float32{a, {0.1, 1, 0}, d}},
		{name: "full: a loaded EAM replaced in memory is not written back", capacity: 2, file: [][]float32{a, b}, load: true,
			added: [][]float32{{0, 1, 0.2}, {0, 0.5, 1}}, want: [][]float32{a, {0, 0.5, 1}}},
		{name: "full: EAMs of two processes compete by similarity", capacity: 2, other: [][]float32{a},
			added: [][]float32{b, {0.9, 0.1, 0}}, want: [][]float32{{0.9, 0.1, 0}, b}},
		{name: "a larger file is fitted to this capacity", capacity: 2, file: [][]float32{a, b, d},
			added: [][]float32{{1, 0, 0.1}}, want: [][]float32{{1, 0, 0.1}, b}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "eamc.trace")
			if tc.file != nil {
				// Written with a capacity that holds it all, as if by a
				// process with a larger EAMC.
				require.NoError(t, collOf(t, len(tc.file), rowsOf(tc.file)...).SaveFile(path))
			}
			mine, err := NewCollection(1, 3, tc.capacity)
			require.NoError(t, err)
			if tc.load {
				mine = loadLikeEngine(t, path, 1, 3, tc.capacity)
			}
			if tc.other != nil {
				o := loadLikeEngine(t, path, 1, 3, tc.capacity)
				for _, m := range rowsOf(tc.other) {
					require.NoError(t, o.Add(m))
				}
				require.NoError(t, o.SaveFile(path))
			}
			for _, m := range rowsOf(tc.added) {
				require.NoError(t, mine.Add(m))
			}
			inMemory := mine.Snapshot()

			require.NoError(t, mine.SaveFile(path))

			assert.Equal(t, tc.want, countsOf(t, path))
			assert.Equal(t, inMemory, mine.Snapshot(), "saving leaves the collection in memory as it was")
			got, err := LoadFile(path)
			require.NoError(t, err)
			assert.Equal(t, tc.capacity, got.Capacity(), "the file has the saver's capacity")
		})
	}
}

func TestSaveFile_RepeatedSavesDoNotDoubleCount(t *testing.T) {
	a := []float32{1, 0, 0}
	b := []float32{0, 1, 0}
	path := filepath.Join(t.TempDir(), "eamc.trace")
	c, err := NewCollection(1, 3, 8)
	require.NoError(t, err)
	require.NoError(t, c.Add(eamOf(a)))
	require.NoError(t, c.SaveFile(path))
	require.NoError(t, c.SaveFile(path), "a save with nothing new")
	assert.Equal(t, [][]float32{a}, countsOf(t, path))
	require.NoError(t, c.Add(eamOf(b)))
	require.NoError(t, c.SaveFile(path))
	assert.Equal(t, [][]float32{a, b}, countsOf(t, path))
}

func TestSaveFile_SyncedSetIsPerFile(t *testing.T) {
	a := []float32{1, 0, 0}
	b := []float32{0, 1, 0}
	dir := t.TempDir()
	home, export := filepath.Join(dir, "home.trace"), filepath.Join(dir, "export.trace")
	require.NoError(t, collOf(t, 4, eamOf(a)).SaveFile(home))

	c := loadLikeEngine(t, home, 1, 3, 4)
	require.NoError(t, c.Add(eamOf(b)))
	require.NoError(t, c.SaveFile(export), "an export first (SaveTrace to another path)")
	assert.Equal(t, [][]float32{a, b}, countsOf(t, export), "a new file gets every EAM")
	require.NoError(t, c.SaveFile(home))
	assert.Equal(t, [][]float32{a, b}, countsOf(t, home), "the export did not make b look saved to home")
}

func TestSaveFile_ReplacesUnusableFiles(t *testing.T) {
	a := []float32{1, 0, 0}
	var otherShape, newer []byte
	{
		c := collOf(t, 2, eamOf([]float32{1, 2}, []float32{3, 4}))
		otherShape = saved(t, c)
		newer = saved(t, collOf(t, 1, eamOf(a)))
		newer[8] = 2 // version 2
		newer = fixCRC(newer)
	}
	tests := []struct {
		name     string
		contents []byte
	}{
		{"corrupt", []byte("MOEITRC1 garbage")},
		{"empty", nil},
		{"another shape", otherShape},
		{"unsupported version", newer},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "eamc.trace")
			require.NoError(t, os.WriteFile(path, tc.contents, 0o644))
			require.NoError(t, collOf(t, 3, eamOf(a)).SaveFile(path))
			assert.Equal(t, [][]float32{a}, countsOf(t, path))
		})
	}
}

func TestSaveFile_UnreadableCurrentFileFailsTheSave(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "eamc.trace")
	require.NoError(t, os.Mkdir(path, 0o755)) // reading it fails with EISDIR
	err := collOf(t, 2, eamOf([]float32{1})).SaveFile(path)
	require.Error(t, err)
	assert.ErrorContains(t, err, "read the current trace file")
	info, err := os.Stat(path)
	require.NoError(t, err)
	assert.True(t, info.IsDir(), "left as it was")
}

func TestMerge_OnlyLaterOccurrencesBeyondSyncedAreNew(t *testing.T) {
	a, b := eamOf([]float32{1, 0}), eamOf([]float32{0, 1})
	es := func(ms ...*EAM) []entry {
		out := make([]entry, len(ms))
		for i, m := range ms {
			out[i] = entry{m: m, pn: prefixSqNorms(m)}
		}
		return out
	}
	tests := []struct {
		name   string
		disk   []entry
		mine   []entry
		synced map[uint64]int
		want   []*EAM
	}{
		{"nothing synced: all of mine after disk", es(b), es(a, a), nil, []*EAM{b, a, a}},
		{"synced copies are skipped", es(a), es(a, a, b), map[uint64]int{eamID(a): 1}, []*EAM{a, a, b}},
		{"synced beyond memory adds nothing", es(a), es(a), map[uint64]int{eamID(a): 3}, []*EAM{a}},
		{"synced ids absent from disk stay absent", nil, es(a, b), map[uint64]int{eamID(a): 1}, []*EAM{b}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := maps.Clone(tc.synced)
			out, err := merge(tc.disk, tc.mine, tc.synced, 1, 2, 8)
			require.NoError(t, err)
			assert.Equal(t, tc.want, out.Snapshot())
			assert.Equal(t, before, tc.synced, "merge does not modify synced")
		})
	}
}

func TestEAMID_DependsOnlyOnTheCounts(t *testing.T) {
	a := eamOf([]float32{1, 2}, []float32{3, 4})
	assert.Equal(t, eamID(a), eamID(a.Clone()))
	b := a.Clone()
	b.Counts[3] = 4.0000005
	assert.NotEqual(t, eamID(a), eamID(b))
	// A fixed value: ids must agree between processes and platforms.
	assert.Equal(t, uint64(0xcbf29ce484222325), eamID(NewEAM(0, 0)), "FNV-1a offset basis for no counts")
}

func TestSaveFile_ConcurrentSaversInOneProcessLoseNothing(t *testing.T) {
	const savers, each = 8, 5
	path := filepath.Join(t.TempDir(), "eamc.trace")
	var wg sync.WaitGroup
	errs := make([]error, savers)
	for g := range savers {
		wg.Go(func() {
			c, err := NewCollection(2, 4, savers*each)
			if err != nil {
				errs[g] = err
				return
			}
			for j := range each {
				if err := c.Add(distinctEAM(g, j)); err != nil {
					errs[g] = err
					return
				}
			}
			errs[g] = c.SaveFile(path)
		})
	}
	wg.Wait()
	for g, err := range errs {
		require.NoError(t, err, "saver %d", g)
	}
	got, err := LoadFile(path)
	require.NoError(t, err)
	assertHolds(t, got, savers, each)
}

// distinctEAM returns a 2x4 EAM that is different for every (who, j).
func distinctEAM(who, j int) *EAM {
	return eamOf([]float32{float32(who + 1), float32(j + 1), 1, 0}, []float32{0, 1, float32(who), float32(j)})
}

// assertHolds asserts that c holds exactly one copy of distinctEAM(w, j) for
// every w < who and j < each, and nothing else.
func assertHolds(t *testing.T, c *Collection, who, each int) {
	t.Helper()
	ids := idCounts(c.entries)
	require.Equal(t, who*each, c.Len(), "EAM count")
	for w := range who {
		for j := range each {
			assert.Equal(t, 1, ids[eamID(distinctEAM(w, j))], "EAM %d of saver %d", j, w)
		}
	}
}
