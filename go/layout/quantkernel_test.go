package layout

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/dtype"
	"github.com/moe-infinity/moe_infinity/go/quant"
	"github.com/moe-infinity/moe_infinity/go/store"
)

func TestFP8KernelLocatesThePerExpertMatricesAndTheirGrids(t *testing.T) {
	mods := fp8Experts(t, 1, 2)
	slot, v, err := BuildQuantized(fp8Spec, mods)
	require.NoError(t, err)
	k, err := v.FP8Kernel("gate_up_proj", "down_proj")
	require.NoError(t, err)
	off := func(name string) int64 {
		r, ok := slot.Region(name)
		require.True(t, ok, name)
		return r.Offset
	}
	assert.Equal(t, quant.Block{Rows: 128, Cols: 128}, k.Block)
	assert.Equal(t, int64(160), k.Hidden)
	assert.Equal(t, int64(136), k.Inter)
	// [136, 160] gate and up: a 2×2 grid; down [160, 136]: 2×2 as well.
	assert.Equal(t, FP8Matrix{Weight: off("gate_proj.weight"), Scale: off("gate_proj.weight_scale_inv"), ScaleBytes: 16}, k.Gate)
	assert.Equal(t, FP8Matrix{Weight: off("up_proj.weight"), Scale: off("up_proj.weight_scale_inv"), ScaleBytes: 16}, k.Up)
	assert.Equal(t, FP8Matrix{Weight: off("down_proj.weight"), Scale: off("down_proj.weight_scale_inv"), ScaleBytes: 16}, k.Down)
}

// fusedFP8 registers one layer of E fused FP8 experts: gate_up_proj [E, 2I, H]
// and down_proj [E, H, I] with grids for block, scales of scaleT.
func fusedFP8(t *testing.T, E, H, I int64, block quant.Block, scaleT dtype.DType) []*store.MoEModule {
	t.Helper()
	c := store.New()
	p := "model.layers.0.mlp.experts."
	add := func(name string, rows, cols int64) {
		sr, sc := block.ScaleGrid(int(rows), int(cols))
		require.NoError(t, c.AddHost(p+name, dtype.F8E4M3, []int64{E, rows, cols}, make([]byte, E*rows*cols)))
		require.NoError(t, c.AddHost(p+name+"_scale_inv", scaleT, []int64{E, int64(sr), int64(sc)}, make([]byte, E*int64(sr*sc*scaleT.Size()))))
	}
	add("gate_up_proj", 2*I, H)
	add("down_proj", H, I)
	idx, err := c.Experts()
	require.NoError(t, err)
	return idx.Modules
}

func fusedSpec(block quant.Block) Spec {
	return Spec{QuantMethod: "fp8", WeightBlockSize: []int64{int64(block.Rows), int64(block.Cols)}, Regions: []RegionSpec{
		{Name: "gate_up_proj", Parts: []string{"gate_up_proj"}, DType: "bfloat16"},
		{Name: "down_proj", Parts: []string{"down_proj"}, DType: "bfloat16"},
	}}
}

func TestFP8KernelLocatesUpInAFusedWeightBySharedGridRows(t *testing.T) {
	block := quant.Block{Rows: 2, Cols: 4}
	slot, v, err := BuildQuantized(fusedSpec(block), fusedFP8(t, 2, 8, 3, block, dtype.F32))
	require.NoError(t, err)
	k, err := v.FP8Kernel("gate_up_proj", "down_proj")
	require.NoError(t, err)
	gu, _ := slot.Region("gate_up_proj")
	gs, _ := slot.Region("gate_up_proj_scale_inv")
	// gate_up [6, 8] with blocks [2, 4]: one 3×2 grid for both halves.
	assert.Equal(t, FP8Matrix{Weight: gu.Offset, Scale: gs.Offset, ScaleBytes: 24}, k.Gate)
	assert.Equal(t, FP8Matrix{Weight: gu.Offset + 3*8, Scale: gs.Offset, ScaleBytes: 24, Row0: 3}, k.Up,
		"up is rows 3-5 of the one weight; its row 0 is in grid row 1 (3/2), not 0")
}

func TestFP8KernelSaysWhyKernelsCannotReadTheExperts(t *testing.T) {
	block := quant.Block{Rows: 2, Cols: 4}
	_, bf16Scales, err := BuildQuantized(fusedSpec(block), fusedFP8(t, 1, 8, 4, block, dtype.BF16))
	require.NoError(t, err)
	_, good, err := BuildQuantized(fusedSpec(block), fusedFP8(t, 1, 8, 4, block, dtype.F32))
	require.NoError(t, err)
	tests := []struct {
		name         string
		v            *Views
		gateUp, down string
		want         string
	}{
		{"MXFP4", &Views{Method: "mxfp4"}, "gate_up_proj", "down_proj", "read FP8 block-scaled experts, not mxfp4"},
		{"bfloat16 scales", bf16Scales, "gate_up_proj", "down_proj", "read float32 weight_scale_inv"},
		{"no such region", good, "w13", "down_proj", `need a "w13" region`},
		{"gate_up and down swapped", good, "down_proj", "gate_up_proj", "need gate_up_proj [H, I] = [4, 4] (got [8 8])"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := tc.v.FP8Kernel(tc.gateUp, tc.down)
			assert.ErrorContains(t, err, tc.want)
		})
	}
}
