package layout

import (
	"encoding/binary"
	"fmt"
	"math"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/dtype"
	"github.com/moe-infinity/moe_infinity/go/store"
)

func f32bytes(vals ...float32) []byte {
	b := make([]byte, 4*len(vals))
	for i, v := range vals {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(v))
	}
	return b
}

func bf16bytes(vals ...float32) []byte {
	b := make([]byte, 2*len(vals))
	for i, v := range vals {
		binary.LittleEndian.PutUint16(b[2*i:], uint16(math.Float32bits(v)>>16))
	}
	return b
}

// perExpert registers L layers × E experts with roles w1 [2,3], w3 [2,3],
// w2 [3,2] in bf16 (values exactly representable).
func perExpert(t *testing.T, L, E int) (*store.Checkpoint, []*store.MoEModule) {
	t.Helper()
	c := store.New()
	for l := 0; l < L; l++ {
		for x := 0; x < E; x++ {
			for r, role := range []string{"w1", "w2", "w3"} {
				shape := []int64{2, 3}
				if role == "w2" {
					shape = []int64{3, 2}
				}
				vals := make([]float32, 6)
				for i := range vals {
					vals[i] = float32(l*64 + x*16 + r*8 + i)
				}
				name := fmt.Sprintf("m.layers.%d.moe.experts.%d.%s.weight", l, x, role)
				require.NoError(t, c.AddHost(name, dtype.BF16, shape, bf16bytes(vals...)))
			}
		}
	}
	idx, err := c.Experts()
	require.NoError(t, err)
	return c, idx.Modules
}

var spec = Spec{Regions: []RegionSpec{
	{Name: "gate_up_proj", Parts: []string{"w1.weight", "w3.weight"}, DType: "float32"},
	{Name: "down_proj", Parts: []string{"w2.weight"}, DType: "float32"},
}, Alignment: 64}

func TestBuildPlacesAlignedRegions(t *testing.T) {
	_, mods := perExpert(t, 2, 3)
	l, err := Build(spec, mods)
	require.NoError(t, err)
	require.Len(t, l.Regions, 2)
	assert.Equal(t, Region{Name: "gate_up_proj", DType: "float32", Shape: []int64{4, 3}, Offset: 0, Bytes: 48,
		Parts: []string{"w1.weight", "w3.weight"}, dt: dtype.F32}, l.Regions[0])
	assert.Equal(t, int64(64), l.Regions[1].Offset)
	assert.Equal(t, []int64{3, 2}, l.Regions[1].Shape)
	assert.Equal(t, int64(128), l.SlotBytes)
	assert.Equal(t, int64(3*6*2), l.SourceBytes, "three bf16 parts of six elements")
	assert.Contains(t, string(l.JSON()), `"slot_bytes":128`)
}

func TestFillConcatenatesAndConverts(t *testing.T) {
	_, mods := perExpert(t, 2, 3)
	l, err := Build(spec, mods)
	require.NoError(t, err)
	dst := make([]byte, l.SlotBytes)
	for i := range dst {
		dst[i] = 0xAA // padding must be zeroed
	}
	require.NoError(t, l.Fill(mods[1], 2, dst))
	got := make([]float32, 12)
	for i := range got {
		got[i] = math.Float32frombits(binary.LittleEndian.Uint32(dst[4*i:]))
	}
	want := []float32{}
	for _, r := range []int{0, 2} { // w1 then w3
		for i := 0; i < 6; i++ {
			want = append(want, float32(64+2*16+r*8+i))
		}
	}
	assert.Equal(t, want, got)
	assert.Equal(t, make([]byte, 64-48), dst[48:64], "padding zeroed")
	down := math.Float32frombits(binary.LittleEndian.Uint32(dst[64:]))
	assert.Equal(t, float32(64+2*16+1*8), down)
}

func TestKeepsSourceDtypeWhenUnset(t *testing.T) {
	_, mods := perExpert(t, 1, 1)
	l, err := Build(Spec{Regions: []RegionSpec{{Name: "w2", Parts: []string{"w2.weight"}}}}, mods)
	require.NoError(t, err)
	assert.Equal(t, "bfloat16", l.Regions[0].DType)
	assert.Equal(t, int64(DefaultAlignment), l.SlotBytes)
}

func TestBuildErrors(t *testing.T) {
	_, mods := perExpert(t, 1, 2)
	for _, tc := range []struct {
		name string
		spec Spec
		mods []*store.MoEModule
		msg  string
	}{
		{"no modules", spec, nil, "no MoE modules"},
		{"no regions", Spec{}, mods, "no regions"},
		{"bad alignment", Spec{Regions: spec.Regions, Alignment: 48}, mods, "not a power of two"},
		{"empty name", Spec{Regions: []RegionSpec{{Parts: []string{"w1.weight"}}}}, mods, "empty name"},
		{"duplicate", Spec{Regions: []RegionSpec{{Name: "a", Parts: []string{"w1.weight"}}, {Name: "a", Parts: []string{"w2.weight"}}}}, mods, `"a" listed twice`},
		{"no parts", Spec{Regions: []RegionSpec{{Name: "a"}}}, mods, "has no parts"},
		{"missing role", Spec{Regions: []RegionSpec{{Name: "a", Parts: []string{"w9.weight"}}}}, mods, "roles present: w1.weight, w2.weight, w3.weight"},
		{"bad concat", Spec{Regions: []RegionSpec{{Name: "a", Parts: []string{"w1.weight", "w2.weight"}}}}, mods, "cannot concatenate"},
		{"bad dtype", Spec{Regions: []RegionSpec{{Name: "a", Parts: []string{"w1.weight"}, DType: "float128"}}}, mods, `"float128"`},
		{"int dtype", Spec{Regions: []RegionSpec{{Name: "a", Parts: []string{"w1.weight"}, DType: "I64"}}}, mods, "not a float type"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Build(tc.spec, tc.mods)
			require.ErrorContains(t, err, tc.msg)
		})
	}
}

func TestModulesMustAgree(t *testing.T) {
	c := store.New()
	for l, rows := range []int64{2, 3} {
		name := fmt.Sprintf("m.layers.%d.moe.experts.0.w1.weight", l)
		require.NoError(t, c.AddHost(name, dtype.F32, []int64{rows, 2}, make([]byte, rows*2*4)))
	}
	idx, err := c.Experts()
	require.NoError(t, err)
	_, err = Build(Spec{Regions: []RegionSpec{{Name: "a", Parts: []string{"w1.weight"}}}}, idx.Modules)
	require.ErrorContains(t, err, `module "m.layers.1.moe" differs from "m.layers.0.moe"`)
}

func TestIntegerRolesAreRejected(t *testing.T) {
	c := store.New()
	require.NoError(t, c.AddHost("m.layers.0.moe.experts.0.idx", dtype.I64, []int64{2}, make([]byte, 16)))
	idx, err := c.Experts()
	require.NoError(t, err)
	_, err = Build(Spec{Regions: []RegionSpec{{Name: "a", Parts: []string{"idx"}}}}, idx.Modules)
	require.ErrorContains(t, err, `host: tensor "m.layers.0.moe.experts.0.idx" has dtype I64; expert weights must be float32, float16 or bfloat16`)
}

func TestFillErrors(t *testing.T) {
	_, mods := perExpert(t, 1, 2)
	l, err := Build(spec, mods)
	require.NoError(t, err)
	require.ErrorContains(t, l.Fill(mods[0], 0, make([]byte, 10)), "smaller than a slot")
	require.ErrorContains(t, l.Fill(mods[0], 7, make([]byte, l.SlotBytes)), "has no expert 7")
}

func TestParseSpec(t *testing.T) {
	s, err := ParseSpec([]byte(`{"regions":[{"name":"a","parts":["x","y"],"dtype":"bfloat16"}],"alignment":128}`))
	require.NoError(t, err)
	assert.Equal(t, Spec{Regions: []RegionSpec{{Name: "a", Parts: []string{"x", "y"}, DType: "bfloat16"}}, Alignment: 128}, s)
	_, err = ParseSpec([]byte(`{"region": []}`))
	require.ErrorContains(t, err, "bad spec JSON")
}
