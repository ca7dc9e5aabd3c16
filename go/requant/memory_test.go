package requant

import (
	"errors"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/dtype"
	"github.com/moe-infinity/moe_infinity/go/quant"
	"github.com/moe-infinity/moe_infinity/go/store"
)

// TestModuleInMemoryIsTheShardFP8Writes: the same tensors, names, shapes
// and bytes as the shard on disk, for both layouts.
func TestModuleInMemoryIsTheShardFP8Writes(t *testing.T) {
	fused := func(t *testing.T, dir string) {
		writeSafetensors(t, filepath.Join(dir, "model.safetensors"), map[string]tensor{
			"model.layers.0.mlp.experts.gate_up_proj":      bf16s([]int64{4, 64, 48}, wave(1)),
			"model.layers.0.mlp.experts.gate_up_proj_bias": bf16s([]int64{4, 64}, wave(2)),
			"model.layers.0.mlp.experts.down_proj":         bf16s([]int64{4, 48, 32}, wave(3)),
		})
	}
	for _, tc := range []struct {
		name      string
		write     func(*testing.T, string)
		block     quant.Block
		tensors   int
		quantized int
	}{
		{"per expert", perExpert, quant.Block{}, 9, 3},
		{"fused", fused, quant.Block{Rows: 16, Cols: 32}, 5, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src, out := t.TempDir(), filepath.Join(t.TempDir(), "fp8")
			tc.write(t, src)
			res, err := FP8(Options{Source: src, Dir: out, Key: "k", Block: tc.block})
			require.NoError(t, err)
			disk, err := store.Open(out)
			require.NoError(t, err)
			defer disk.Close()

			cp, err := Module(open(t, src), MemoryOptions{Block: tc.block, Workers: 3})
			require.NoError(t, err)
			defer func() { require.NoError(t, store.FreeHost(cp.Mem)) }()
			assert.Equal(t, res.Bytes, cp.Bytes)
			assert.Equal(t, res.SourceBytes, cp.SourceBytes)
			assert.Equal(t, tc.quantized, cp.Quantized)
			require.Len(t, cp.Tensors, tc.tensors)
			assert.Len(t, disk.Names(), tc.tensors)
			for _, ht := range cp.Tensors {
				dt, ok := disk.Tensor(ht.Name)
				require.True(t, ok, ht.Name)
				assert.Equal(t, dt.DType, ht.DType, ht.Name)
				assert.Equal(t, dt.Shape, ht.Shape, ht.Name)
				assert.Equal(t, dt.Bytes(), ht.Data, ht.Name)
			}
		})
	}
}

func TestModuleErrors(t *testing.T) {
	c := store.New()
	defer c.Close()
	require.NoError(t, c.AddHost("m.experts.0.w.weight", dtype.U8, []int64{2, 2}, make([]byte, 4)))
	idx, err := c.Experts()
	require.NoError(t, err)
	_, err = Module(idx.Modules[0], MemoryOptions{})
	assert.ErrorIs(t, err, ErrSource, "integer experts are not float")

	f := store.New()
	defer f.Close()
	require.NoError(t, f.AddHost("m.experts.0.w.weight", dtype.BF16, []int64{2, 2}, make([]byte, 8)))
	idx, err = f.Experts()
	require.NoError(t, err)
	boom := errors.New("boom")
	_, err = Module(idx.Modules[0], MemoryOptions{Alloc: func(int64) ([]byte, error) { return nil, boom }})
	assert.ErrorIs(t, err, boom)
	_, err = Module(idx.Modules[0], MemoryOptions{Guard: func(func() error) error { return boom }})
	assert.ErrorIs(t, err, boom, "a failed read frees the memory and says why")
	_, err = Module(idx.Modules[0], MemoryOptions{Block: quant.Block{Rows: -1, Cols: 4}})
	assert.ErrorContains(t, err, "must be positive")
	_, err = Module(idx.Modules[0], MemoryOptions{Alloc: func(n int64) ([]byte, error) { return make([]byte, n-1), nil }})
	assert.ErrorContains(t, err, "Alloc gave")
}
