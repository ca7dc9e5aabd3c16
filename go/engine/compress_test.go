package engine

import (
	"encoding/binary"
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
			view := e.views.view(int(slots[0]))[gu.Offset : gu.Offset+int64(tI*tH*4)]
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
