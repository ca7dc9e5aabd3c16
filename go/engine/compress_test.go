package engine

import (
	"encoding/binary"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/dtype"
	"github.com/moe-infinity/moe_infinity/go/layout"
	"github.com/moe-infinity/moe_infinity/go/quant"
	"github.com/moe-infinity/moe_infinity/go/store"
)

// TestCompressedCheckpointIsServedAsFP8: the F32 test model compressed
// with AddCompressed is served from its FP8 copy, dequantized into the
// views exactly as DequantFP8Block reads the copy, within FP8's error of
// the source.
func TestCompressedCheckpointIsServedAsFP8(t *testing.T) {
	const L, E = 2, 3
	dir := t.TempDir()
	src := filepath.Join(dir, "model.safetensors")
	writeModelFile(t, src, L, E)
	e, err := New(Config{BudgetBytes: 1 << 20, Prefetch: noPrefetch()})
	require.NoError(t, err)
	t.Cleanup(func() { _ = e.Close() })
	req := CompressRequest{Source: src, Dir: filepath.Join(dir, "offload", "experts-fp8"), Key: "v1"}
	res, err := e.AddCompressed(req)
	require.NoError(t, err)
	assert.Equal(t, L*E*3, res.Quantized)
	assert.False(t, res.Reused)
	done, total := e.Progress()
	assert.Equal(t, res.SourceBytes, total)
	assert.Equal(t, total, done)
	again, err := e.AddCompressed(req) // a retry after MOE_ERR_BUFFER: nothing is added twice
	require.NoError(t, err)
	assert.Equal(t, res, again)

	spec := layout.Spec{QuantMethod: res.QuantMethod, WeightBlockSize: []int64{int64(res.WeightBlockSize[0]), int64(res.WeightBlockSize[1])}, Regions: []layout.RegionSpec{
		{Name: "gate_up_proj", Parts: []string{"w1.weight", "w3.weight"}, DType: "float32"},
		{Name: "down_proj", Parts: []string{"w2.weight"}, DType: "float32"},
	}}
	p, err := e.Configure(Setup{Layout: spec})
	require.NoError(t, err)
	require.NotNil(t, p.Views)
	assert.Equal(t, "fp8", p.Views.Dequant)

	copyCk, err := store.Open(res.Dir)
	require.NoError(t, err)
	defer copyCk.Close()
	idx, err := copyCk.Experts()
	require.NoError(t, err)
	gu, _ := p.Layout.Region("gate_up_proj")
	for l := 0; l < L; l++ {
		mod := idx.Modules[l]
		for x := 0; x < E; x++ {
			slots := make([]int32, 1)
			lease, err := e.Acquire(l, []int32{int32(x)}, slots, 0)
			require.NoError(t, err)
			view := viewBytes(t, e, int(slots[0]))[gu.Offset : gu.Offset+int64(tI*tH*4)]
			qp, err := mod.QuantPart(x, "w1")
			require.NoError(t, err)
			want := make([]byte, tI*tH*4)
			require.NoError(t, quant.DequantFP8Block(want, dtype.F32, qp.Weight.Data, qp.Scales.Data, dtype.F32, tI, tH, quant.Block{Rows: 128, Cols: 128}))
			require.Equal(t, want, view, "expert (%d, %d)", l, x)
			for i := 0; i < tI*tH; i++ {
				v := math.Float32frombits(binary.LittleEndian.Uint32(view[4*i:]))
				require.InDelta(t, value(l, x, 0, i), v, float64(value(l, x, 0, i))/16+1e-6)
			}
			e.Release(lease, 0)
		}
	}
}

func TestCompressingAQuantizedCheckpointIsUnsupported(t *testing.T) {
	dir := t.TempDir()
	w, s := make([]byte, 4), make([]byte, 4)
	hdr := `{"m.experts.0.w1.weight":{"dtype":"F8_E4M3","shape":[2,2],"data_offsets":[0,4]},"m.experts.0.w1.weight_scale_inv":{"dtype":"F32","shape":[1,1],"data_offsets":[4,8]}}`
	b := binary.LittleEndian.AppendUint64(nil, uint64(len(hdr)))
	b = append(append(append(b, hdr...), w...), s...)
	src := filepath.Join(dir, "model.safetensors")
	require.NoError(t, os.WriteFile(src, b, 0o644))
	e, err := New(Config{BudgetBytes: 1 << 20, Prefetch: noPrefetch()})
	require.NoError(t, err)
	defer e.Close()
	_, err = e.AddCompressed(CompressRequest{Source: src, Dir: filepath.Join(dir, "o")})
	assert.Equal(t, StatusUnsupported, Code(err), "%v", err)
	_, err = ParseCompressRequest([]byte(`{"source": "x"}`))
	assert.Equal(t, StatusInvalid, Code(err))
	_, err = ParseCompressRequest([]byte(`{"source": "x", "dir": "y", "block": 3}`))
	assert.Equal(t, StatusInvalid, Code(err))
}

// hostModel adds the test model's experts as host tensors (model's) and
// returns their buffers, which the test may scribble on.
func hostModel(t *testing.T, e *Engine, L, E int) [][]byte {
	t.Helper()
	roles := []struct {
		name  string
		shape []int64
	}{{"w1.weight", []int64{tI, tH}}, {"w2.weight", []int64{tH, tI}}, {"w3.weight", []int64{tI, tH}}}
	var bufs [][]byte
	for l := 0; l < L; l++ {
		for x := 0; x < E; x++ {
			for r, ro := range roles {
				n := int(ro.shape[0] * ro.shape[1])
				b := make([]byte, 4*n)
				for i := 0; i < n; i++ {
					binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(value(l, x, r, i)))
				}
				name := fmt.Sprintf("model.layers.%d.block_sparse_moe.experts.%d.%s", l, x, ro.name)
				require.NoError(t, e.AddHostTensor(name, "F32", ro.shape, b))
				bufs = append(bufs, b)
			}
		}
	}
	return bufs
}

// TestCompressHostServesWhatAddCompressedServes: host experts compressed
// layer by layer are served exactly as the same experts compressed from a
// checkpoint (the same views, byte for byte), and the engine no longer
// reads the host tensors once a layer is compressed.
func TestCompressHostServesWhatAddCompressedServes(t *testing.T) {
	const L, E = 2, 3
	dir := t.TempDir()
	src := filepath.Join(dir, "model.safetensors")
	writeModelFile(t, src, L, E)
	disk, err := New(Config{BudgetBytes: 1 << 20, Prefetch: noPrefetch()})
	require.NoError(t, err)
	t.Cleanup(func() { _ = disk.Close() })
	res, err := disk.AddCompressed(CompressRequest{Source: src, Dir: filepath.Join(dir, "fp8"), Key: "v1"})
	require.NoError(t, err)

	host, err := New(Config{BudgetBytes: 1 << 20, Prefetch: noPrefetch()})
	require.NoError(t, err)
	t.Cleanup(func() { _ = host.Close() })
	bufs := hostModel(t, host, L, E)
	var bytes, source int64
	for l := 0; l < L; l++ {
		hr, err := host.CompressHost(HostCompressRequest{Prefix: fmt.Sprintf("model.layers.%d.block_sparse_moe", l)})
		require.NoError(t, err)
		assert.Equal(t, E*3, hr.Released)
		assert.Equal(t, E*3*2, hr.Tensors, "a weight and its scales per source tensor")
		assert.Equal(t, "fp8", hr.QuantMethod)
		assert.Equal(t, res.WeightBlockSize, hr.WeightBlockSize)
		bytes, source = bytes+hr.Bytes, source+hr.SourceBytes
	}
	assert.Equal(t, res.Bytes, bytes)
	assert.Equal(t, res.SourceBytes, source)
	for _, b := range bufs { // the caller frees (here: scribbles on) what it added
		for i := range b {
			b[i] = 0xff
		}
	}

	spec := layout.Spec{QuantMethod: "fp8", WeightBlockSize: []int64{128, 128}, Regions: []layout.RegionSpec{
		{Name: "gate_up_proj", Parts: []string{"w1.weight", "w3.weight"}, DType: "float32"},
		{Name: "down_proj", Parts: []string{"w2.weight"}, DType: "float32"},
	}}
	pd, err := disk.Configure(Setup{Layout: spec})
	require.NoError(t, err)
	ph, err := host.Configure(Setup{Layout: spec})
	require.NoError(t, err)
	assert.Equal(t, pd.SlotBytes, ph.SlotBytes)
	assert.Equal(t, pd.Stored, ph.Stored, "the same stored slot image")
	assert.Equal(t, "fp8", ph.Views.Dequant)
	view := func(e *Engine, l, x int) []byte {
		slots := make([]int32, 1)
		lease, err := e.Acquire(l, []int32{int32(x)}, slots, 0)
		require.NoError(t, err)
		defer e.Release(lease, 0)
		return append([]byte(nil), viewBytes(t, e, int(slots[0]))[:pd.Views.Bytes]...)
	}
	for l := 0; l < L; l++ {
		for x := 0; x < E; x++ {
			want := view(disk, l, x)
			require.Equal(t, want, view(host, l, x), "expert (%d, %d)", l, x)
			v := math.Float32frombits(binary.LittleEndian.Uint32(want))
			require.InDelta(t, value(l, x, 0, 0), v, float64(value(l, x, 0, 0))/16+1e-6)
		}
	}
	_, err = host.CompressHost(HostCompressRequest{Prefix: "model.layers.5.block_sparse_moe"})
	assert.Equal(t, StatusState, Code(err), "after configure: %v", err)
}

func TestCompressHostErrors(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "model.safetensors")
	writeModelFile(t, src, 1, 2)
	e, err := New(Config{BudgetBytes: 1 << 20, Prefetch: noPrefetch()})
	require.NoError(t, err)
	defer e.Close()
	require.NoError(t, e.AddCheckpoint(src))
	require.NoError(t, e.AddHostTensor("model.layers.7.mlp.experts.0.w1.weight", "F32", []int64{2, 2}, make([]byte, 16)))
	require.NoError(t, e.AddHostTensor("model.layers.8.mlp.experts.0.w1.weight", "I32", []int64{2, 2}, make([]byte, 16)))

	_, err = e.CompressHost(HostCompressRequest{Prefix: "model.layers.9.mlp"})
	assert.Equal(t, StatusInvalid, Code(err))
	assert.ErrorContains(t, err, "model.layers.7.mlp", "names the modules there are")
	_, err = e.CompressHost(HostCompressRequest{Prefix: "model.layers.0.block_sparse_moe"})
	assert.Equal(t, StatusInvalid, Code(err))
	assert.ErrorContains(t, err, "add_compressed", "a checkpoint's experts are not host tensors")
	_, err = e.CompressHost(HostCompressRequest{Prefix: "model.layers.8.mlp"})
	assert.Equal(t, StatusUnsupported, Code(err), "integer experts: %v", err)
	first, err := e.CompressHost(HostCompressRequest{Prefix: "model.layers.7.mlp"})
	require.NoError(t, err)
	again, err := e.CompressHost(HostCompressRequest{Prefix: "model.layers.7.mlp"})
	require.NoError(t, err, "a retry after MOE_ERR_BUFFER")
	assert.Equal(t, first, again)

	_, err = ParseHostCompressRequest([]byte(`{}`))
	assert.Equal(t, StatusInvalid, Code(err))
	_, err = ParseHostCompressRequest([]byte(`{"prefix": "a", "block": 2}`))
	assert.Equal(t, StatusInvalid, Code(err))
	r, err := ParseHostCompressRequest([]byte(`{"prefix": "a"}`))
	require.NoError(t, err)
	assert.Equal(t, "a", r.Prefix)
	require.NoError(t, e.Close())
	_, err = e.CompressHost(HostCompressRequest{Prefix: "model.layers.7.mlp"})
	assert.Equal(t, StatusClosed, Code(err))
}
