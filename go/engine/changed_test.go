package engine

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/store"
)

// padBytes is the size of the non-expert tensor the test file starts its
// data with, so that the experts lie in pages a truncation removes.
const padBytes = 3 * 4096

// writeModelFile writes the test model (model's tensors, F32) as one
// safetensors file, with its mtime an hour in the past (so that any write
// changes it even with coarse timestamps).
func writeModelFile(t testing.TB, path string, L, E int) {
	t.Helper()
	roles := []struct {
		name  string
		shape []int64
	}{{"w1.weight", []int64{tI, tH}}, {"w2.weight", []int64{tH, tI}}, {"w3.weight", []int64{tI, tH}}}
	type entry struct {
		DType   string   `json:"dtype"`
		Shape   []int64  `json:"shape"`
		Offsets [2]int64 `json:"data_offsets"`
	}
	hdr := map[string]entry{"model.embed_tokens.weight": {"F32", []int64{padBytes / 4}, [2]int64{0, padBytes}}}
	data := make([]byte, padBytes)
	for l := 0; l < L; l++ {
		for x := 0; x < E; x++ {
			for r, ro := range roles {
				n := int(ro.shape[0] * ro.shape[1])
				begin := int64(len(data))
				for i := 0; i < n; i++ {
					data = binary.LittleEndian.AppendUint32(data, math.Float32bits(value(l, x, r, i)))
				}
				name := fmt.Sprintf("model.layers.%d.block_sparse_moe.experts.%d.%s", l, x, ro.name)
				hdr[name] = entry{"F32", ro.shape, [2]int64{begin, int64(len(data))}}
			}
		}
	}
	h, err := json.Marshal(hdr)
	require.NoError(t, err)
	out := binary.LittleEndian.AppendUint64(nil, uint64(len(h)))
	out = append(append(out, h...), data...)
	require.NoError(t, os.WriteFile(path, out, 0o644))
	old := time.Now().Add(-time.Hour)
	require.NoError(t, os.Chtimes(path, old, old))
}

// fileEngine configures an engine on a copy of the test model at path,
// with one slot (every acquire of another expert copies it again).
func fileEngine(t *testing.T, path string, L, E int) *Engine {
	t.Helper()
	writeModelFile(t, path, L, E)
	e, err := New(Config{BudgetBytes: slotBytes, Prefetch: noPrefetch()})
	require.NoError(t, err)
	require.NoError(t, e.AddCheckpoint(path))
	_, err = e.Configure(Setup{Layout: mixtralSpec})
	require.NoError(t, err)
	t.Cleanup(func() { _ = e.Close() })
	return e
}

// acquireRelease acquires (layer, x), returns the slot's first floats and
// releases it.
func acquireRelease(e *Engine, layer int, x int32) ([]float32, error) {
	slots := make([]int32, 1)
	lease, err := e.Acquire(layer, []int32{x}, slots, 0)
	if err != nil {
		return nil, err
	}
	defer e.Release(lease, 0)
	b := e.be.(interface{ SlotBytes(int) []byte }).SlotBytes(int(slots[0]))
	out := make([]float32, 3)
	for i := range out {
		out[i] = math.Float32frombits(binary.LittleEndian.Uint32(b[4*i:]))
	}
	return out, nil
}

func TestCheckpointChangedUnderALoadedEngine(t *testing.T) {
	const L, E = 2, 3
	tests := []struct {
		name    string
		change  func(t *testing.T, path string)
		changed string // substring of the error; "" = keeps working
	}{
		{"truncated in place", func(t *testing.T, path string) {
			require.NoError(t, os.Truncate(path, 100))
		}, "-> 100 bytes"},
		{"rewritten in place with the same size", func(t *testing.T, path string) {
			b, err := os.ReadFile(path)
			require.NoError(t, err)
			b[len(b)-1] ^= 1
			require.NoError(t, os.WriteFile(path, b, 0o644))
		}, "same size, modified"},
		{"unlinked: the mapping keeps the loaded pages", func(t *testing.T, path string) {
			require.NoError(t, os.Remove(path))
		}, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "a.safetensors")
			e := fileEngine(t, path, L, E)
			other := fileEngine(t, filepath.Join(dir, "b.safetensors"), L, E)
			got, err := acquireRelease(e, 1, 2)
			require.NoError(t, err)
			assert.Equal(t, []float32{value(1, 2, 0, 0), value(1, 2, 0, 1), value(1, 2, 0, 2)}, got)

			tc.change(t, path)

			// The layer check before the acquire, and the guarded fill on
			// its own (the fault path: without the guard a truncated
			// file's page kills the process).
			_, acqErr := acquireRelease(e, 0, 1)
			src := e.be.(interface{ SlotBytes(int) []byte })
			fillErr := source{lay: e.lay, mods: e.mods, ckpt: e.ckpt, files: e.files}.Fill(0, 1, make([]byte, len(src.SlotBytes(0))))
			if tc.changed == "" {
				require.NoError(t, acqErr)
				require.NoError(t, fillErr)
			} else {
				for _, err := range []error{acqErr, fillErr} {
					require.ErrorIs(t, err, store.ErrCheckpointChanged)
					assert.Contains(t, err.Error(), "checkpoint file "+path+" changed on disk")
					assert.Contains(t, err.Error(), tc.changed)
				}
			}
			// The other engine, on an untouched file, is unaffected.
			got, err = acquireRelease(other, 0, 1)
			require.NoError(t, err)
			assert.Equal(t, []float32{value(0, 1, 0, 0), value(0, 1, 0, 1), value(0, 1, 0, 2)}, got)
		})
	}
}

// BenchmarkCheckLayer is what the identity check adds to each layer's
// Acquire: one fstat per shard the layer's experts live in (one here).
func BenchmarkCheckLayer(b *testing.B) {
	path := filepath.Join(b.TempDir(), "model.safetensors")
	writeModelFile(b, path, 2, 3)
	e, err := New(Config{BudgetBytes: slotBytes, Prefetch: noPrefetch()})
	require.NoError(b, err)
	defer e.Close()
	require.NoError(b, e.AddCheckpoint(path))
	_, err = e.Configure(Setup{Layout: mixtralSpec})
	require.NoError(b, err)
	b.ReportAllocs()
	for b.Loop() {
		if err := e.checkLayer(1); err != nil {
			b.Fatal(err)
		}
	}
}
