package store

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/dtype"
)

func TestReplaceHostSwapsTensorsAndOwnsTheMemory(t *testing.T) {
	c := New()
	caller := []byte{1, 2, 3, 4}
	require.NoError(t, c.AddHost("m.experts.0.w.weight", dtype.BF16, []int64{2}, caller))
	require.NoError(t, c.AddHost("keep", dtype.U8, []int64{1}, []byte{9}))
	mem, err := AllocHost(4096)
	require.NoError(t, err)
	assert.Equal(t, make([]byte, 4096), mem, "zeroed")
	copy(mem, []byte{7, 8, 5, 6, 0, 0, 0, 0})
	add := []HostTensor{
		{Name: "m.experts.0.w.weight", DType: dtype.F8E4M3, Shape: []int64{2}, Data: mem[0:2]},
		{Name: "m.experts.0.w.weight_scale_inv", DType: dtype.F32, Shape: []int64{1}, Data: mem[4:8]},
	}
	require.NoError(t, c.ReplaceHost([]string{"m.experts.0.w.weight"}, add, mem))
	w, ok := c.Tensor("m.experts.0.w.weight")
	require.True(t, ok)
	assert.Equal(t, dtype.F8E4M3, w.DType)
	assert.Equal(t, []byte{7, 8}, w.Bytes())
	assert.Equal(t, HostSource, w.Source)
	assert.Equal(t, []string{"keep", "m.experts.0.w.weight", "m.experts.0.w.weight_scale_inv"}, c.Names())
	idx, err := c.Experts()
	require.NoError(t, err)
	require.Len(t, idx.Modules, 1)
	assert.Equal(t, []string{"w.weight", "w.weight_scale_inv"}, idx.Modules[0].Roles)
	require.NoError(t, c.Close(), "the owned memory is unmapped")
	assert.Equal(t, []byte{1, 2, 3, 4}, caller, "the caller's memory is never written")
}

func TestReplaceHostIsAllOrNothing(t *testing.T) {
	mem, err := AllocHost(64)
	require.NoError(t, err)
	other := make([]byte, 8)
	f8 := func(name string, b []byte) HostTensor {
		return HostTensor{Name: name, DType: dtype.F8E4M3, Shape: []int64{int64(len(b))}, Data: b}
	}
	for _, tc := range []struct {
		name   string
		remove []string
		add    []HostTensor
		is     error
		msg    string
	}{
		{"unknown name to remove", []string{"nope"}, nil, ErrNotFound, "no host tensor"},
		{"removing a file tensor is refused too", []string{"file"}, nil, ErrNotFound, "no host tensor"},
		{"adding over a kept tensor", nil, []HostTensor{f8("a", mem[:4])}, ErrDuplicate, "duplicate"},
		{"adding a name twice", []string{"a"}, []HostTensor{f8("a", mem[:4]), f8("a", mem[4:8])}, ErrDuplicate, "duplicate"},
		{"bytes outside mem", []string{"a"}, []HostTensor{f8("a", other)}, nil, "outside the memory"},
		{"bytes not the shape's", []string{"a"}, []HostTensor{{Name: "a", DType: dtype.F32, Shape: []int64{3}, Data: mem[:4]}}, nil, "needs 12"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := New()
			defer c.Close()
			require.NoError(t, c.AddHost("a", dtype.U8, []int64{2}, []byte{1, 2}))
			c.tensors["file"] = &Tensor{Name: "file", DType: dtype.U8, Shape: []int64{1}, Source: "/x.safetensors", data: []byte{0}}
			err := c.ReplaceHost(tc.remove, tc.add, mem)
			require.Error(t, err)
			if tc.is != nil {
				assert.ErrorIs(t, err, tc.is)
			}
			assert.Contains(t, err.Error(), tc.msg)
			a, ok := c.Tensor("a")
			require.True(t, ok, "nothing was removed")
			assert.Equal(t, dtype.U8, a.DType)
			assert.Empty(t, c.owned, "mem is still the caller's")
		})
	}
	c := New()
	require.NoError(t, c.Close())
	assert.ErrorIs(t, c.ReplaceHost(nil, nil, mem), ErrClosed)
	require.NoError(t, FreeHost(mem))
	_, err = AllocHost(0)
	assert.Error(t, err)
}
