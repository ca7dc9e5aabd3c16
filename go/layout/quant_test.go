package layout

import (
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/dtype"
	"github.com/moe-infinity/moe_infinity/go/store"
)

// golden reads one of go/quant's transformers goldens.
func golden(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "quant", "testdata", name))
	require.NoError(t, err, "regenerate with: python3 go/quant/testdata/gen_golden.py")
	return b
}

// sameBF16 checks bf16 bytes bit for bit, except that a NaN only has to
// stay NaN (the goldens' random FP8 bytes include the NaN codes, whose
// payload torch does not keep).
func sameBF16(t *testing.T, want, got []byte, what string) {
	t.Helper()
	require.Equal(t, len(want), len(got), what)
	for i := 0; i+1 < len(want); i += 2 {
		w, g := binary.LittleEndian.Uint16(want[i:]), binary.LittleEndian.Uint16(got[i:])
		nanW, nanG := w&0x7fff > 0x7f80, g&0x7fff > 0x7f80
		if nanW != nanG || (!nanW && w != g) {
			t.Fatalf("%s: element %d is %#04x, want %#04x", what, i/2, g, w)
		}
	}
}

// fp8Experts registers L layers × E experts shaped like Qwen3-FP8 /
// DeepSeek-V3 experts: gate_proj and up_proj [136, 160] and down_proj
// [160, 136] float8_e4m3fn with float32 weight_scale_inv grids for
// 128×128 blocks (partial blocks on both axes). gate_proj is the
// transformers golden fp8_136x160_b128 (up_proj and down_proj reuse its
// bytes); a bf16 bias role rides along as a plain part.
func fp8Experts(t *testing.T, L, E int) []*store.MoEModule {
	t.Helper()
	w := golden(t, "fp8_136x160_b128.weight.bin")
	s := golden(t, "fp8_136x160_b128.scale_inv.bin")
	c := store.New()
	for l := 0; l < L; l++ {
		for x := 0; x < E; x++ {
			p := fmt.Sprintf("model.layers.%d.mlp.experts.%d.", l, x)
			for _, role := range []string{"gate_proj", "up_proj", "down_proj"} {
				shape, grid := []int64{136, 160}, []int64{2, 2}
				if role == "down_proj" {
					shape = []int64{160, 136}
				}
				require.NoError(t, c.AddHost(p+role+".weight", dtype.F8E4M3, shape, w))
				require.NoError(t, c.AddHost(p+role+".weight_scale_inv", dtype.F32, grid, s))
			}
			require.NoError(t, c.AddHost(p+"bias", dtype.BF16, []int64{4}, bf16bytes(1, 2, 3, float32(x))))
		}
	}
	idx, err := c.Experts()
	require.NoError(t, err)
	return idx.Modules
}

var fp8Spec = Spec{
	QuantMethod: "fp8", WeightBlockSize: []int64{128, 128},
	Regions: []RegionSpec{
		{Name: "gate_up_proj", Parts: []string{"gate_proj.weight", "up_proj.weight"}, DType: "bfloat16"},
		{Name: "down_proj", Parts: []string{"down_proj.weight"}, DType: "bfloat16"},
		{Name: "bias", Parts: []string{"bias"}, DType: "float32"},
	},
}

// slotOf fills expert x of m into a fresh slot image.
func slotOf(t *testing.T, l *Layout, m *store.MoEModule, x int) []byte {
	t.Helper()
	b := make([]byte, l.SlotBytes)
	require.NoError(t, l.Fill(m, x, b))
	return b
}

func TestQuantizedFP8SlotHoldsTheCheckpointBytesAndViewsDequantizeAsTransformers(t *testing.T) {
	mods := fp8Experts(t, 2, 3)
	require.True(t, Quantized(fp8Spec, mods[0]))
	slot, v, err := BuildQuantized(fp8Spec, mods)
	require.NoError(t, err)

	// The slot image is the stored parts, once each, in their dtypes.
	var names, dts []string
	for _, r := range slot.Regions {
		names, dts = append(names, r.Name), append(dts, r.DType)
	}
	assert.Equal(t, []string{"gate_proj.weight", "gate_proj.weight_scale_inv", "up_proj.weight", "up_proj.weight_scale_inv",
		"down_proj.weight", "down_proj.weight_scale_inv", "bias"}, names)
	assert.Equal(t, []string{"float8_e4m3fn", "float32", "float8_e4m3fn", "float32", "float8_e4m3fn", "float32", "bfloat16"}, dts)
	assert.Equal(t, int64(3*136*160+3*16+8), slot.SourceBytes, "one byte per FP8 value, the scales, the bias")
	segs, ok := slot.Segments(mods[1], 2)
	require.True(t, ok, "every part is copied as stored")
	assert.Len(t, segs, 7)

	// The view image is what transformers' parameters hold.
	gu, _ := v.Layout.Region("gate_up_proj")
	dn, _ := v.Layout.Region("down_proj")
	assert.Equal(t, []int64{272, 160}, gu.Shape)
	assert.Equal(t, []int64{160, 136}, dn.Shape)
	assert.Equal(t, "bfloat16", gu.DType)
	assert.Equal(t, slot.SourceBytes, v.Layout.SourceBytes)
	assert.Equal(t, "fp8", v.Method)

	dst := make([]byte, v.Layout.SlotBytes)
	for i := range dst {
		dst[i] = 0xAA // padding must come back zeroed
	}
	require.NoError(t, v.Expand(slotOf(t, slot, mods[1], 2), dst))
	want := golden(t, "fp8_136x160_b128.BF16.bin")
	half := int64(len(want))
	sameBF16(t, want, dst[gu.Offset:gu.Offset+half], "gate_proj: bit for bit transformers' dequantization")
	sameBF16(t, want, dst[gu.Offset+half:gu.Offset+2*half], "up_proj follows gate_proj (transformers' concatenation)")
	b, _ := v.Layout.Region("bias")
	assert.Equal(t, f32bytes(1, 2, 3, 2), dst[b.Offset:b.Offset+b.Bytes], "plain parts are converted")

	// The program a device runs: one op per part, in view order, each the
	// size of its part (gate, up, down, bias).
	ops := v.Ops()
	require.Len(t, ops, 4)
	assert.Equal(t, []ExpandKind{ExpandFP8Block, ExpandFP8Block, ExpandFP8Block, ExpandConvert}, []ExpandKind{ops[0].Kind, ops[1].Kind, ops[2].Kind, ops[3].Kind})
	assert.Equal(t, gu.Offset, ops[0].Dst)
	assert.Equal(t, ops[0].Dst+ops[0].DstBytes, ops[1].Dst, "up follows gate")
	assert.Equal(t, dn.Offset, ops[2].Dst)
	assert.Equal(t, [4]int64{136, 160, 128, 128}, [4]int64{ops[0].Rows, ops[0].Cols, ops[0].BlockRows, ops[0].BlockCols})
	assert.Equal(t, ops[0].Rows*ops[0].Cols*2, ops[0].DstBytes, "bfloat16 out")
	assert.Equal(t, dtype.F32, ops[0].ScaleType)
	assert.Equal(t, b.Offset, ops[3].Dst)
	assert.Equal(t, [2]dtype.DType{dtype.BF16, dtype.F32}, [2]dtype.DType{ops[3].SrcType, ops[3].DstType})
	for _, op := range ops {
		assert.LessOrEqual(t, op.Src+op.SrcBytes, slot.SlotBytes)
		assert.LessOrEqual(t, op.Scales+op.ScalesBytes, slot.SlotBytes)
	}
	bad := ops[0]
	bad.Src = slot.SlotBytes
	require.ErrorContains(t, bad.Run(slotOf(t, slot, mods[1], 2), dst), "outside a slot image")
	for i := gu.Offset + gu.Bytes; i < dn.Offset; i++ {
		require.Zero(t, dst[i], "padding byte %d", i)
	}
}

func TestQuantizedMXFP4FusedViewsAreTransposedAsTransformers(t *testing.T) {
	blocks := golden(t, "mxfp4_2x6x3.blocks.bin") // [2 experts, 6 rows, 3 groups, 16]
	scales := golden(t, "mxfp4_2x6x3.scales.bin") // [2, 6, 3]
	want := golden(t, "mxfp4_2x6x3.BF16.bin")     // [2, 96, 6]
	c := store.New()
	p := "model.layers.0.mlp.experts."
	require.NoError(t, c.AddHost(p+"gate_up_proj_blocks", dtype.U8, []int64{2, 6, 3, 16}, blocks))
	require.NoError(t, c.AddHost(p+"gate_up_proj_scales", dtype.U8, []int64{2, 6, 3}, scales))
	require.NoError(t, c.AddHost(p+"gate_up_proj_bias", dtype.BF16, []int64{2, 6}, bf16bytes(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12)))
	idx, err := c.Experts()
	require.NoError(t, err)
	spec := Spec{QuantMethod: "mxfp4", Regions: []RegionSpec{
		{Name: "gate_up_proj", Parts: []string{"gate_up_proj"}, DType: "bfloat16"},
		{Name: "gate_up_proj_bias", Parts: []string{"gate_up_proj_bias"}, DType: "bfloat16"},
	}}
	slot, v, err := BuildQuantized(spec, idx.Modules)
	require.NoError(t, err)
	assert.Equal(t, int64(6*3*16+6*3+12), slot.SourceBytes)
	gu, _ := v.Layout.Region("gate_up_proj")
	assert.Equal(t, []int64{96, 6}, gu.Shape, "[cols, rows]: gpt-oss's [hidden, 2·intermediate]")
	dst := make([]byte, v.Layout.SlotBytes)
	for x := 0; x < 2; x++ {
		require.NoError(t, v.Expand(slotOf(t, slot, idx.Modules[0], x), dst))
		n := int64(len(want) / 2)
		sameBF16(t, want[int64(x)*n:int64(x+1)*n], dst[gu.Offset:gu.Offset+gu.Bytes], fmt.Sprintf("expert %d", x))
	}
	ops := v.Ops()
	require.Len(t, ops, 2)
	assert.Equal(t, ExpandMXFP4T, ops[0].Kind)
	assert.Equal(t, [3]int64{6, 96, gu.Bytes}, [3]int64{ops[0].Rows, ops[0].Cols, ops[0].DstBytes}, "the stored shape; the view holds its transpose")
	assert.Equal(t, int64(6*3), ops[0].ScalesBytes, "one e8m0 byte per 32 values")
	assert.Equal(t, ExpandConvert, ops[1].Kind)
}

func TestBuildQuantizedErrors(t *testing.T) {
	mods := fp8Experts(t, 1, 2)
	with := func(f func(*Spec)) Spec {
		s := fp8Spec
		s.Regions = append([]RegionSpec(nil), fp8Spec.Regions...)
		f(&s)
		return s
	}
	for _, tc := range []struct {
		name string
		spec Spec
		want string
	}{
		{"no block size", with(func(s *Spec) { s.WeightBlockSize = nil }), "needs weight_block_size"},
		{"block that does not give the grid", with(func(s *Spec) { s.WeightBlockSize = []int64{64, 128} }), "needs a [3, 2]"},
		{"method of another format", with(func(s *Spec) { s.QuantMethod = "mxfp4" }), `is fp8 but quantization_config.quant_method is "mxfp4"`},
		{"unknown method", with(func(s *Spec) { s.QuantMethod = "gptq" }), "supported: fp8, mxfp4"},
		{"no dtype", with(func(s *Spec) { s.Regions[0].DType = "" }), "needs a dtype"},
		{"unknown role", with(func(s *Spec) { s.Regions[1].Parts = []string{"w9.weight"} }), "no role"},
		{"scales as a part", with(func(s *Spec) { s.Regions[1].Parts = []string{"down_proj.weight_scale_inv"} }), ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := BuildQuantized(tc.spec, mods)
			if tc.want == "" {
				require.NoError(t, err, "float32 scales are a plain float part")
				return
			}
			require.Error(t, err)
			assert.Contains(t, err.Error(), tc.want)
		})
	}
}
