package store

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"math"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/dtype"
)

// stTensor is one tensor for writeSafetensors; data defaults to bytes
// derived from the tensor's position when nil.
type stTensor struct {
	name  string
	dt    dtype.DType
	shape []int64
	data  []byte
}

// writeSafetensors writes ts as one safetensors file at path and returns
// each tensor's data, by name.
func writeSafetensors(t *testing.T, path string, ts []stTensor) map[string][]byte {
	t.Helper()
	hdr := map[string]any{"__metadata__": map[string]string{"format": "pt"}}
	var data []byte
	out := map[string][]byte{}
	for i, st := range ts {
		n, ok := byteSize(st.shape, st.dt)
		require.True(t, ok)
		b := st.data
		if b == nil {
			b = make([]byte, n)
			for j := range b {
				b[j] = byte(i*31 + j*7)
			}
		}
		require.Len(t, b, int(n), st.name)
		hdr[st.name] = map[string]any{"dtype": st.dt.String(), "shape": st.shape, "data_offsets": []int{len(data), len(data) + len(b)}}
		data = append(data, b...)
		out[st.name] = b
	}
	js, err := json.Marshal(hdr)
	require.NoError(t, err)
	file := binary.LittleEndian.AppendUint64(nil, uint64(len(js)))
	file = append(append(file, js...), data...)
	require.NoError(t, os.WriteFile(path, file, 0o644))
	return out
}

func f32Bytes(vs ...float32) []byte {
	b := make([]byte, 4*len(vs))
	for i, v := range vs {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(v))
	}
	return b
}

// TestQuantDeepSeekFP8 mirrors DeepSeek-V3's published names in a sharded
// checkpoint: per-expert F8_E4M3 weights with F32 weight_scale_inv, FP8
// shared experts, the router's e_score_correction_bias, a dense layer, and
// the MTP layer (model.layers.61 when num_hidden_layers is 61; here layer 2
// of a 2-layer model) whose experts are indexed like any other. The expert
// shape 200 x 136 is not a multiple of the 128 block.
func TestQuantDeepSeekFP8(t *testing.T) {
	dir := t.TempDir()
	const E, I, H = 3, 200, 136 // moe_intermediate_size, hidden_size
	f8, f32, bf16 := dtype.F8E4M3, dtype.F32, dtype.BF16
	shard1 := []stTensor{
		{"model.embed_tokens.weight", bf16, []int64{16, H}, nil},
		{"model.layers.0.mlp.gate_proj.weight", f8, []int64{I, H}, nil}, // dense first layer
		{"model.layers.0.mlp.gate_proj.weight_scale_inv", f32, []int64{2, 2}, nil},
		{"model.layers.1.mlp.gate.weight", bf16, []int64{E, H}, nil},
		{"model.layers.1.mlp.gate.e_score_correction_bias", f32, []int64{E}, nil},
		{"model.layers.1.mlp.shared_experts.gate_proj.weight", f8, []int64{I, H}, nil},
		{"model.layers.1.mlp.shared_experts.gate_proj.weight_scale_inv", f32, []int64{2, 2}, nil},
	}
	var shard2 []stTensor
	for _, layer := range []string{"1", "2"} {
		for e := 0; e < E; e++ {
			p := "model.layers." + layer + ".mlp.experts." + string(rune('0'+e)) + "."
			shard2 = append(shard2,
				stTensor{p + "gate_proj.weight", f8, []int64{I, H}, nil},
				stTensor{p + "gate_proj.weight_scale_inv", f32, []int64{2, 2}, f32Bytes(float32(e), 1, 2, 3)},
				stTensor{p + "up_proj.weight", f8, []int64{I, H}, nil},
				stTensor{p + "up_proj.weight_scale_inv", f32, []int64{2, 2}, nil},
				stTensor{p + "down_proj.weight", f8, []int64{H, I}, nil},
				stTensor{p + "down_proj.weight_scale_inv", f32, []int64{2, 2}, nil},
			)
		}
	}
	shard2 = append(shard2, stTensor{"model.layers.2.eh_proj.weight", f8, []int64{H, 2 * H}, nil},
		stTensor{"model.layers.2.eh_proj.weight_scale_inv", f32, []int64{2, 3}, nil},
		stTensor{"model.layers.2.enorm.weight", bf16, []int64{H}, nil})
	d1 := writeSafetensors(t, filepath.Join(dir, "model-00001-of-00002.safetensors"), shard1)
	d2 := writeSafetensors(t, filepath.Join(dir, "model-00002-of-00002.safetensors"), shard2)
	wm := map[string]string{}
	for n := range d1 {
		wm[n] = "model-00001-of-00002.safetensors"
	}
	for n := range d2 {
		wm[n] = "model-00002-of-00002.safetensors"
	}
	idx, err := json.Marshal(map[string]any{"metadata": map[string]any{"total_size": 1}, "weight_map": wm})
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(dir, IndexFileName), idx, 0o644))

	c, err := Open(dir)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	x, err := c.Experts()
	require.NoError(t, err)
	require.Len(t, x.Modules, 2, "layer 1 and the MTP layer; the gate, shared experts and dense MLP are not routed experts")
	for i, prefix := range []string{"model.layers.1.mlp", "model.layers.2.mlp"} {
		m := x.Modules[i]
		assert.Equal(t, prefix, m.Prefix)
		assert.Equal(t, E, m.NumExperts)
		assert.False(t, m.Fused)
		assert.Equal(t, []QuantWeight{
			{Name: "down_proj", Format: FP8Block, WeightRole: "down_proj.weight", ScaleRole: "down_proj.weight_scale_inv", Rows: H, Cols: I, ScaleRows: 2, ScaleCols: 2},
			{Name: "gate_proj", Format: FP8Block, WeightRole: "gate_proj.weight", ScaleRole: "gate_proj.weight_scale_inv", Rows: I, Cols: H, ScaleRows: 2, ScaleCols: 2},
			{Name: "up_proj", Format: FP8Block, WeightRole: "up_proj.weight", ScaleRole: "up_proj.weight_scale_inv", Rows: I, Cols: H, ScaleRows: 2, ScaleCols: 2},
		}, m.Quant)
		for _, q := range m.Quant {
			assert.NoError(t, q.CheckFP8Block(128, 128), q.Name)
		}
	}
	m := x.Modules[0]
	qp, err := m.QuantPart(2, "gate_proj")
	require.NoError(t, err)
	assert.Equal(t, "model.layers.1.mlp.experts.2.gate_proj.weight", qp.Weight.Tensor)
	assert.Equal(t, f8, qp.Weight.DType)
	assert.Equal(t, []int64{I, H}, qp.Weight.Shape)
	assert.Equal(t, d2[qp.Weight.Tensor], qp.Weight.Data)
	assert.Equal(t, f32Bytes(2, 1, 2, 3), qp.Scales.Data)
	assert.Equal(t, "model.layers.1.mlp.experts.2.gate_proj.weight_scale_inv", qp.Scales.Tensor)
	assert.Equal(t, filepath.Join(dir, "model-00002-of-00002.safetensors"), qp.Scales.Source)

	q, err := m.QuantWeight("gate_proj")
	require.NoError(t, err)
	assert.ErrorContains(t, q.CheckFP8Block(64, 128), "needs a [4, 2]")
	assert.Error(t, q.CheckFP8Block(0, 128))
	_, err = m.QuantPart(3, "gate_proj")
	assert.ErrorIs(t, err, ErrNotFound)
	_, err = m.QuantPart(0, "gate_up_proj")
	assert.ErrorIs(t, err, ErrNotFound)
	assert.ErrorContains(t, err, "quantized: [down_proj, gate_proj, up_proj]")
}

// TestQuantGptOssMXFP4 mirrors gpt-oss's fused names: gate_up_proj_blocks
// [E, 2I, H/32, 16], gate_up_proj_scales [E, 2I, H/32], gate_up_proj_bias
// [E, 2I], and the same for down_proj; the router is not an expert.
func TestQuantGptOssMXFP4(t *testing.T) {
	dir := t.TempDir()
	const E, I, H = 4, 32, 64
	u8, bf16 := dtype.U8, dtype.BF16
	data := writeSafetensors(t, filepath.Join(dir, SingleFileName), []stTensor{
		{"model.layers.0.mlp.router.weight", bf16, []int64{E, H}, nil},
		{"model.layers.0.mlp.router.bias", bf16, []int64{E}, nil},
		{"model.layers.0.mlp.experts.gate_up_proj_blocks", u8, []int64{E, 2 * I, H / 32, 16}, nil},
		{"model.layers.0.mlp.experts.gate_up_proj_scales", u8, []int64{E, 2 * I, H / 32}, nil},
		{"model.layers.0.mlp.experts.gate_up_proj_bias", bf16, []int64{E, 2 * I}, nil},
		{"model.layers.0.mlp.experts.down_proj_blocks", u8, []int64{E, H, I / 32, 16}, nil},
		{"model.layers.0.mlp.experts.down_proj_scales", u8, []int64{E, H, I / 32}, nil},
		{"model.layers.0.mlp.experts.down_proj_bias", bf16, []int64{E, H}, nil},
	})
	c, err := Open(dir)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	x, err := c.Experts()
	require.NoError(t, err)
	require.Len(t, x.Modules, 1)
	m := x.Modules[0]
	assert.True(t, m.Fused)
	assert.Equal(t, []QuantWeight{
		{Name: "down_proj", Format: MXFP4, WeightRole: "down_proj_blocks", ScaleRole: "down_proj_scales", Rows: H, Cols: I, ScaleRows: H, ScaleCols: I / 32},
		{Name: "gate_up_proj", Format: MXFP4, WeightRole: "gate_up_proj_blocks", ScaleRole: "gate_up_proj_scales", Rows: 2 * I, Cols: H, ScaleRows: 2 * I, ScaleCols: H / 32},
	}, m.Quant)
	qp, err := m.QuantPart(1, "gate_up_proj")
	require.NoError(t, err)
	per := 2 * I * H / 2
	assert.Equal(t, data["model.layers.0.mlp.experts.gate_up_proj_blocks"][per:2*per], qp.Weight.Data)
	sper := 2 * I * H / 32
	assert.Equal(t, data["model.layers.0.mlp.experts.gate_up_proj_scales"][sper:2*sper], qp.Scales.Data)
	assert.Equal(t, []int64{2 * I, H / 32}, qp.Scales.Shape)
	assert.ErrorContains(t, m.Quant[0].CheckFP8Block(128, 128), "mxfp4")
	assert.Equal(t, "mxfp4", MXFP4.String())
	assert.Equal(t, "fp8", FP8Block.String())
}

// TestQuantMalformed: roles that look quantized but do not fit a format stay
// plain roles (Experts succeeds) and asking for the quantized weight says
// why.
func TestQuantMalformed(t *testing.T) {
	f8, f32, u8 := dtype.F8E4M3, dtype.F32, dtype.U8
	for _, tc := range []struct {
		name    string
		tensors []hostTensor
		weight  string
		why     string
	}{
		{"fp8 without scales", []hostTensor{{"m.experts.0.w1.weight", f8, []int64{4, 4}}}, "w1", "per-tensor FP8 is not supported"},
		{"scales without weight", []hostTensor{{"m.experts.0.w1.weight_scale_inv", f32, []int64{1, 1}}}, "w1", "no weight role"},
		{"fp8 scales of the wrong dtype", []hostTensor{
			{"m.experts.0.w1.weight", f8, []int64{4, 4}}, {"m.experts.0.w1.weight_scale_inv", u8, []int64{1, 1}}}, "w1", "want F32"},
		{"scalar scale", []hostTensor{
			{"m.experts.0.w1.weight", f8, []int64{4, 4}}, {"m.experts.0.w1.weight_scale_inv", f32, []int64{}}}, "w1", "2-D"},
		{"scale grid larger than the weight", []hostTensor{
			{"m.experts.0.w1.weight", f8, []int64{4, 4}}, {"m.experts.0.w1.weight_scale_inv", f32, []int64{5, 1}}}, "w1", "cannot be a block grid"},
		{"bf16 weight with scales", []hostTensor{
			{"m.experts.0.w1.weight", dtype.BF16, []int64{4, 4}}, {"m.experts.0.w1.weight_scale_inv", f32, []int64{1, 1}}}, "w1", "want F8_E4M3"},
		{"blocks without scales", []hostTensor{{"m.experts.down_blocks", u8, []int64{2, 4, 1, 16}}}, "down", "no scales role"},
		{"blocks not 16 bytes", []hostTensor{
			{"m.experts.down_blocks", u8, []int64{2, 4, 1, 8}}, {"m.experts.down_scales", u8, []int64{2, 4, 1}}}, "down", "[rows, groups, 16]"},
		{"scales mismatch", []hostTensor{
			{"m.experts.down_blocks", u8, []int64{2, 4, 2, 16}}, {"m.experts.down_scales", u8, []int64{2, 4, 1}}}, "down", "[rows, groups, 16]"},
		{"bf16 blocks", []hostTensor{
			{"m.experts.down_blocks", dtype.BF16, []int64{2, 4, 1, 16}}, {"m.experts.down_scales", u8, []int64{2, 4, 1}}}, "down", "must be U8"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			x, err := hostCheckpoint(t, tc.tensors).Experts()
			require.NoError(t, err)
			require.Len(t, x.Modules, 1)
			m := x.Modules[0]
			assert.Empty(t, m.Quant)
			_, err = m.QuantPart(0, tc.weight)
			assert.True(t, errors.Is(err, ErrNotFound), "%v", err)
			assert.ErrorContains(t, err, tc.why)
		})
	}
}

// TestQuantFusedFP8: fused FP8 experts ("<name>" + "<name>_scale_inv", the
// names transformers gives FP8Experts) pair up too.
func TestQuantFusedFP8(t *testing.T) {
	x, err := hostCheckpoint(t, []hostTensor{
		{"model.layers.0.mlp.experts.gate_up_proj", dtype.F8E4M3, []int64{2, 256, 130}},
		{"model.layers.0.mlp.experts.gate_up_proj_scale_inv", dtype.F32, []int64{2, 2, 2}},
	}).Experts()
	require.NoError(t, err)
	require.Len(t, x.Modules, 1)
	require.Len(t, x.Modules[0].Quant, 1)
	q := x.Modules[0].Quant[0]
	assert.Equal(t, QuantWeight{Name: "gate_up_proj", Format: FP8Block, WeightRole: "gate_up_proj", ScaleRole: "gate_up_proj_scale_inv",
		Rows: 256, Cols: 130, ScaleRows: 2, ScaleCols: 2}, q)
	assert.NoError(t, q.CheckFP8Block(128, 128))
	qp, err := x.Modules[0].QuantPart(1, "gate_up_proj")
	require.NoError(t, err)
	assert.Len(t, qp.Weight.Data, 256*130)
	assert.Len(t, qp.Scales.Data, 2*2*4)
}
