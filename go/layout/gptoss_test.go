package layout

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/dtype"
	"github.com/moe-infinity/moe_infinity/go/store"
)

// gptOssModules registers one layer of E gpt-oss experts as the releases
// fuse them: MXFP4 blocks and scales for the matrices when mxfp4, else
// gate_up_proj [E, H, 2I] and down_proj [E, I, H] in wt; biases in bt.
func gptOssModules(t *testing.T, E, H, I int64, mxfp4 bool, wt, bt dtype.DType) []*store.MoEModule {
	t.Helper()
	c := store.New()
	p := "model.layers.0.mlp.experts."
	add := func(name string, dt dtype.DType, shape ...int64) {
		n := int64(dt.Size())
		for _, d := range shape {
			n *= d
		}
		require.NoError(t, c.AddHost(p+name, dt, shape, make([]byte, n)))
	}
	if mxfp4 {
		add("gate_up_proj_blocks", dtype.U8, E, 2*I, H/32, 16)
		add("gate_up_proj_scales", dtype.U8, E, 2*I, H/32)
		add("down_proj_blocks", dtype.U8, E, H, I/32, 16)
		add("down_proj_scales", dtype.U8, E, H, I/32)
	} else {
		add("gate_up_proj", wt, E, H, 2*I)
		add("down_proj", wt, E, I, H)
	}
	add("gate_up_proj_bias", bt, E, 2*I)
	add("down_proj_bias", bt, E, H)
	idx, err := c.Experts()
	require.NoError(t, err)
	return idx.Modules
}

func gptOssSpec(dt string, mxfp4 bool) Spec {
	s := Spec{}
	if mxfp4 {
		s.QuantMethod = "mxfp4"
	}
	for _, name := range GptOssRegions {
		s.Regions = append(s.Regions, RegionSpec{Name: name, Parts: []string{name}, DType: dt})
	}
	return s
}

func TestGptOssKernelLocatesTheBF16MatricesAndBiases(t *testing.T) {
	lay, err := Build(gptOssSpec("bfloat16", false), gptOssModules(t, 2, 64, 32, false, dtype.BF16, dtype.BF16))
	require.NoError(t, err)
	k, err := lay.GptOssKernel()
	require.NoError(t, err)
	off := func(name string) int64 {
		r, ok := lay.Region(name)
		require.True(t, ok, name)
		return r.Offset
	}
	assert.Equal(t, GptOssKernel{Hidden: 64, Inter: 32, DType: dtype.BF16, GateUp: off("gate_up_proj"), GateUpBias: off("gate_up_proj_bias"),
		Down: off("down_proj"), DownBias: off("down_proj_bias")}, k)
}

func TestGptOssKernelLocatesTheMXFP4BlocksScalesAndBiasesInTheSlot(t *testing.T) {
	slot, v, err := BuildQuantized(gptOssSpec("bfloat16", true), gptOssModules(t, 2, 64, 96, true, 0, dtype.BF16))
	require.NoError(t, err)
	k, err := v.GptOssKernel()
	require.NoError(t, err)
	off := func(name string) int64 {
		r, ok := slot.Region(name)
		require.True(t, ok, name)
		return r.Offset
	}
	assert.Equal(t, GptOssKernel{Hidden: 64, Inter: 96, DType: dtype.BF16, MXFP4: true,
		GateUp: off("gate_up_proj_blocks"), GateUpScale: off("gate_up_proj_scales"), GateUpBias: off("gate_up_proj_bias"),
		Down: off("down_proj_blocks"), DownScale: off("down_proj_scales"), DownBias: off("down_proj_bias")}, k,
		"offsets in the slot image (the checkpoint's bytes), sizes from the views")
}

func TestGptOssKernelSaysWhyKernelsCannotReadTheExperts(t *testing.T) {
	f32, err := Build(gptOssSpec("float32", false), gptOssModules(t, 1, 64, 32, false, dtype.F32, dtype.F32))
	require.NoError(t, err)
	mixed, err := Build(Spec{Regions: []RegionSpec{
		{Name: "gate_up_proj", Parts: []string{"gate_up_proj"}, DType: "bfloat16"},
		{Name: "gate_up_proj_bias", Parts: []string{"gate_up_proj_bias"}, DType: "float32"},
		{Name: "down_proj", Parts: []string{"down_proj"}, DType: "bfloat16"},
		{Name: "down_proj_bias", Parts: []string{"down_proj_bias"}, DType: "bfloat16"},
	}}, gptOssModules(t, 1, 64, 32, false, dtype.BF16, dtype.BF16))
	require.NoError(t, err)
	noBias, err := Build(Spec{Regions: []RegionSpec{
		{Name: "gate_up_proj", Parts: []string{"gate_up_proj"}},
		{Name: "down_proj", Parts: []string{"down_proj"}},
	}}, gptOssModules(t, 1, 64, 32, false, dtype.BF16, dtype.BF16))
	require.NoError(t, err)
	swapped, err := Build(Spec{Regions: []RegionSpec{
		{Name: "gate_up_proj", Parts: []string{"down_proj"}},
		{Name: "gate_up_proj_bias", Parts: []string{"gate_up_proj_bias"}},
		{Name: "down_proj", Parts: []string{"gate_up_proj"}},
		{Name: "down_proj_bias", Parts: []string{"down_proj_bias"}},
	}}, gptOssModules(t, 1, 64, 32, false, dtype.BF16, dtype.BF16))
	require.NoError(t, err)
	tests := []struct {
		name string
		lay  *Layout
		want string
	}{
		{"float32 experts", f32, "take bfloat16 or float16 experts, not float32"},
		{"a bias in another dtype", mixed, "every region in one dtype"},
		{"no biases", noBias, `need a "gate_up_proj_bias" region`},
		{"matrices swapped", swapped, "need gate_up_proj [H, 2I] = [32, 64], gate_up_proj_bias [2I], down_proj [I, H] and down_proj_bias [H] (got [32 64], [64], [64 64]"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := tc.lay.GptOssKernel()
			assert.ErrorContains(t, err, tc.want)
		})
	}
	_, fp8 := fp8ImagesOrFail(t)
	_, err = fp8.GptOssKernel()
	assert.ErrorContains(t, err, "not fp8")
	_, f16Views, err := BuildQuantized(gptOssSpec("float16", true), gptOssModules(t, 1, 64, 32, true, 0, dtype.BF16))
	require.NoError(t, err)
	_, err = f16Views.GptOssKernel()
	assert.ErrorContains(t, err, "read gate_up_proj_bias as stored, bfloat16, but the activations are float16")
}

// fp8ImagesOrFail builds FP8 SwiGLU experts' images (not gpt-oss's).
func fp8ImagesOrFail(t *testing.T) (*Layout, *Views) {
	t.Helper()
	slot, v, err := BuildQuantized(fp8Spec, fp8Experts(t, 1, 2))
	require.NoError(t, err)
	return slot, v
}
