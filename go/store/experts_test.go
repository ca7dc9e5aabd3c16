package store

import (
	"errors"
	"sort"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/dtype"
)

type hostTensor struct {
	name  string
	dt    dtype.DType
	shape []int64
}

func hostCheckpoint(t *testing.T, ts []hostTensor) *Checkpoint {
	t.Helper()
	c := New()
	t.Cleanup(func() { c.Close() })
	for _, ht := range ts {
		n, ok := byteSize(ht.shape, ht.dt)
		require.True(t, ok)
		require.NoError(t, c.AddHost(ht.name, ht.dt, ht.shape, make([]byte, n)))
	}
	return c
}

func TestExpertsLayouts(t *testing.T) {
	type mod struct {
		prefix string
		n      int
		roles  []string
		fused  bool
	}
	f32 := dtype.F32
	tests := []struct {
		name    string
		tensors []hostTensor
		want    []mod
	}{
		{"no experts", []hostTensor{{"model.embed_tokens.weight", f32, []int64{4, 2}}, {"experts.0.w1", f32, []int64{1}}}, nil},
		{"shared experts ignored", []hostTensor{
			{"model.layers.0.mlp.shared_experts.gate_proj.weight", f32, []int64{2}},
			{"model.layers.0.mlp.shared_expert.0.up_proj.weight", f32, []int64{2}},
			{"model.layers.0.mlp.shared_experts.experts_x", f32, []int64{2}},
		}, nil},
		{"hub layout, one expert", []hostTensor{{"m.experts.0.w", dtype.BF16, []int64{2, 2}}}, []mod{{"m", 1, []string{"w"}, false}}},
		{"expert_ prefix and deep roles", []hostTensor{
			{"model.encoder.layers.3.ffn.experts.expert_0.fc1.bias", f32, []int64{2}},
			{"model.encoder.layers.3.ffn.experts.expert_1.fc1.bias", f32, []int64{2}},
			{"model.encoder.layers.3.ffn.experts.expert_0.fc1.weight.scale", dtype.U8, []int64{2}},
			{"model.encoder.layers.3.ffn.experts.expert_1.fc1.weight.scale", dtype.U8, []int64{2}},
		}, []mod{{"model.encoder.layers.3.ffn", 2, []string{"fc1.bias", "fc1.weight.scale"}, false}}},
		{"fused with non-float role and 2-D bias", []hostTensor{
			{"model.layers.1.mlp.experts.gate_up_proj_blocks", dtype.U8, []int64{3, 4, 2, 16}},
			{"model.layers.1.mlp.experts.gate_up_proj_bias", dtype.BF16, []int64{3, 4}},
		}, []mod{{"model.layers.1.mlp", 3, []string{"gate_up_proj_bias", "gate_up_proj_blocks"}, true}}},
		{"natural order", []hostTensor{
			{"model.layers.10.mlp.experts.down_proj", f32, []int64{2, 1}},
			{"model.layers.2.mlp.experts.down_proj", f32, []int64{2, 1}},
			{"model.layers.9.mlp.experts.down_proj", f32, []int64{2, 1}},
			{"decoder.layers.1.mlp.experts.down_proj", f32, []int64{2, 1}},
			{"model.layers.2.mlp.sub.experts.down_proj", f32, []int64{2, 1}},
		}, []mod{
			{"decoder.layers.1.mlp", 2, []string{"down_proj"}, true},
			{"model.layers.2.mlp", 2, []string{"down_proj"}, true},
			{"model.layers.2.mlp.sub", 2, []string{"down_proj"}, true},
			{"model.layers.9.mlp", 2, []string{"down_proj"}, true},
			{"model.layers.10.mlp", 2, []string{"down_proj"}, true},
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := hostCheckpoint(t, tc.tensors)
			x, err := c.Experts()
			require.NoError(t, err)
			var got []mod
			for _, m := range x.Modules {
				got = append(got, mod{m.Prefix, m.NumExperts, m.Roles, m.Fused})
			}
			assert.Equal(t, tc.want, got)
		})
	}
}

func TestExpertsValidation(t *testing.T) {
	f32, bf16 := dtype.F32, dtype.BF16
	tests := []struct {
		name    string
		tensors []hostTensor
		want    []string
		tensor  string
	}{
		{"mixed layouts", []hostTensor{
			{"model.layers.0.mlp.experts.0.w1.weight", f32, []int64{2, 2}},
			{"model.layers.0.mlp.experts.gate_up_proj", f32, []int64{1, 2, 2}},
		}, []string{`MoE module "model.layers.0.mlp": mixes the fused layout`, `"model.layers.0.mlp.experts.0.w1.weight"`}, "model.layers.0.mlp.experts.gate_up_proj"},
		{"ids not from zero", []hostTensor{
			{"m.experts.1.w", f32, []int64{2}},
			{"m.experts.2.w", f32, []int64{2}},
		}, []string{`MoE module "m": expert ids are not 0..1: 2 distinct ids, largest 2, expert 0 missing`}, ""},
		{"gap in ids", []hostTensor{
			{"m.experts.expert_0.w", f32, []int64{2}},
			{"m.experts.expert_1.w", f32, []int64{2}},
			{"m.experts.expert_3.w", f32, []int64{2}},
		}, []string{"expert ids are not 0..2", "expert 2 missing"}, ""},
		{"missing role", []hostTensor{
			{"m.experts.0.w1.weight", f32, []int64{2}},
			{"m.experts.0.w2.weight", f32, []int64{2}},
			{"m.experts.1.w1.weight", f32, []int64{2}},
		}, []string{`MoE module "m": expert 1 has no role "w2.weight"`, `"m.experts.0.w2.weight"`}, ""},
		{"shape mismatch", []hostTensor{
			{"m.experts.0.w", f32, []int64{2, 4}},
			{"m.experts.1.w", f32, []int64{4, 2}},
		}, []string{`role "w" is F32 [4 2] here but F32 [2 4] in "m.experts.0.w"`}, "m.experts.1.w"},
		{"dtype mismatch", []hostTensor{
			{"m.experts.0.w", f32, []int64{4}},
			{"m.experts.1.w", bf16, []int64{8}},
		}, []string{`role "w" is BF16 [8] here but F32 [4]`}, "m.experts.1.w"},
		{"fused dim0 mismatch", []hostTensor{
			{"m.experts.down_proj", bf16, []int64{8, 4, 2}},
			{"m.experts.gate_up_proj", bf16, []int64{4, 4, 4}},
		}, []string{`fused role "gate_up_proj" has 4 experts (shape [4 4 4]) but role "down_proj" has 8`}, "m.experts.gate_up_proj"},
		{"fused 1-D", []hostTensor{{"m.experts.bias", f32, []int64{8}}}, []string{"needs ndim >= 2", "shape [8]"}, "m.experts.bias"},
		{"fused zero experts", []hostTensor{{"m.experts.w", f32, []int64{0, 8}}}, []string{"has 0 experts"}, "m.experts.w"},
		{"leading zero id", []hostTensor{{"m.experts.01.w", f32, []int64{1}}}, []string{`malformed expert id "01"`}, "m.experts.01.w"},
		{"junk id", []hostTensor{{"m.experts.3x.w", f32, []int64{1}}}, []string{`malformed expert id "3x"`}, "m.experts.3x.w"},
		{"expert_ without id", []hostTensor{{"m.experts.expert_.w", f32, []int64{1}}}, []string{`malformed expert id ""`}, "m.experts.expert_.w"},
		{"expert_ junk", []hostTensor{{"m.experts.expert_a.w", f32, []int64{1}}}, []string{`malformed expert id "a"`}, ""},
		{"no role", []hostTensor{{"m.experts.3", f32, []int64{1}}}, []string{`expert tensor "3" has no role`}, "m.experts.3"},
		{"empty role", []hostTensor{{"m.experts.3.", f32, []int64{1}}}, []string{`has no role`}, ""},
		{"empty fused role", []hostTensor{{"m.experts.", f32, []int64{1, 1}}}, []string{`empty role after ".experts."`}, "m.experts."},
		{"huge id", []hostTensor{{"m.experts.99999999999999999999.w", f32, []int64{1}}}, []string{`expert id "99999999999999999999" out of range`}, ""},
		{"big sparse id", []hostTensor{{"m.experts.1000000.w", f32, []int64{1}}}, []string{"expert ids are not 0..0", "largest 1000000"}, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := hostCheckpoint(t, tc.tensors)
			x, err := c.Experts()
			require.Error(t, err)
			assert.Nil(t, x)
			for _, w := range tc.want {
				require.ErrorContains(t, err, w)
			}
			assert.ErrorIs(t, err, ErrExpertLayout)
			var fe *FormatError
			require.True(t, errors.As(err, &fe))
			if tc.tensor != "" {
				assert.Equal(t, tc.tensor, fe.Tensor)
				assert.Equal(t, HostSource, fe.File)
			}
		})
	}
}

func TestPartErrors(t *testing.T) {
	c := hostCheckpoint(t, []hostTensor{
		{"a.experts.0.w", dtype.F32, []int64{2}},
		{"a.experts.1.w", dtype.F32, []int64{2}},
		{"b.experts.w", dtype.F32, []int64{2, 2}},
	})
	x, err := c.Experts()
	require.NoError(t, err)
	for _, prefix := range []string{"a", "b"} {
		m, ok := x.Module(prefix)
		require.True(t, ok)
		_, err = m.Part(2, "w")
		require.ErrorContains(t, err, `MoE module "`+prefix+`": expert 2 out of range [0, 2)`)
		require.ErrorIs(t, err, ErrNotFound)
		_, err = m.Part(-1, "w")
		require.ErrorIs(t, err, ErrNotFound)
		_, err = m.Part(0, "v")
		require.ErrorContains(t, err, `no role "v" (roles: w)`)
		require.ErrorIs(t, err, ErrNotFound)
	}
	_, ok := x.Module("c")
	assert.False(t, ok)

	// Modules not built by Experts have no tensors behind them.
	for _, m := range []*MoEModule{
		{Prefix: "p", NumExperts: 1, Roles: []string{"w"}, Fused: true},
		{Prefix: "p", NumExperts: 1, Roles: []string{"w"}},
	} {
		_, err := m.Part(0, "w")
		require.ErrorContains(t, err, "not built by Checkpoint.Experts")
	}
}

func TestNaturalLess(t *testing.T) {
	in := []string{
		"model.layers.10.mlp", "model.layers.2.mlp", "model.layers.2", "model.layers.02.mlp",
		"model.layers.1.mlp", "decoder.block.11", "decoder.block.3", "model.layers.x", "model.layers.",
		"", "model.layers.100000000000000000000000.mlp", "model.layers.9.mlp",
	}
	want := []string{
		"", "decoder.block.3", "decoder.block.11", "model.layers.", "model.layers.1.mlp",
		"model.layers.02.mlp", "model.layers.2", "model.layers.2.mlp", "model.layers.9.mlp",
		"model.layers.10.mlp", "model.layers.100000000000000000000000.mlp", "model.layers.x",
	}
	got := append([]string(nil), in...)
	sort.Slice(got, func(i, j int) bool { return naturalLess(got[i], got[j]) })
	assert.Equal(t, want, got)
	for _, a := range in {
		assert.False(t, naturalLess(a, a), a)
		for _, b := range in {
			if a != b {
				assert.NotEqual(t, naturalLess(a, b), naturalLess(b, a), "%q vs %q", a, b)
			}
		}
	}
}
