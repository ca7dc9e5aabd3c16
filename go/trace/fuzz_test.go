package trace

import (
	"bytes"
	"errors"
	"testing"

	"github.com/stretchr/testify/require"
)

// FuzzLoad feeds arbitrary bytes to Load. Load must never panic, must fail
// only with ErrCorrupt or ErrUnsupportedVersion, and any collection it
// accepts must re-save to exactly the input bytes. The committed seed corpus
// lives in testdata/fuzz/FuzzLoad (valid files of several shapes, truncated
// files, bad CRCs, versions, dimensions and counts).
func FuzzLoad(f *testing.F) {
	addSeeds(f)
	f.Fuzz(checkLoad)
}

// FuzzLoadValidCRC is FuzzLoad with the trailing CRC recomputed before
// loading, so that the fuzzer gets past the checksum and explores the
// header and count validation.
func FuzzLoadValidCRC(f *testing.F) {
	addSeeds(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) >= 4 {
			data = fixCRC(append([]byte(nil), data...)) // never modify the fuzzer's input
		}
		checkLoad(t, data)
	})
}

// addSeeds adds in-code seeds shared by the Load fuzz targets.
func addSeeds(f *testing.F) {
	f.Add([]byte{})
	f.Add([]byte(Magic))
	for _, c := range []*Collection{
		collOf(f, 1, eamOf([]float32{1})),
		collOf(f, 3, eamOf([]float32{1, 2}, []float32{3, 4}), eamOf([]float32{0, 1}, []float32{1, 0})),
	} {
		var buf bytes.Buffer
		require.NoError(f, c.Save(&buf))
		f.Add(buf.Bytes())
	}
}

// checkLoad asserts the Load invariants on data.
func checkLoad(t *testing.T, data []byte) {
	c, err := Load(bytes.NewReader(data))
	if err != nil {
		require.Nil(t, c)
		if !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrUnsupportedVersion) {
			t.Fatalf("unexpected error class: %v", err)
		}
		return
	}
	var buf bytes.Buffer
	require.NoError(t, c.Save(&buf))
	require.Equal(t, data, buf.Bytes(), "re-save must reproduce the input")
	require.LessOrEqual(t, c.Len(), c.Capacity())
	for _, m := range c.Snapshot() {
		require.NoError(t, m.validate(c.Layers(), c.Experts()))
	}
}
