package cuda

import (
	"flag"
	"os"
	"reflect"
	"regexp"
	"strconv"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

var update = flag.Bool("update", false, "rewrite cuda/moe_params.h from kparams.go (go generate ./go/backend/cuda)")

const paramsHeader = "../../../cuda/moe_params.h"

// The committed header is what kparams.go generates: the kernels' structs
// are stated once, in Go.
func TestKernelParamsHeaderIsGenerated(t *testing.T) {
	want, err := kernelParamsHeader()
	require.NoError(t, err)
	if *update {
		require.NoError(t, os.WriteFile(paramsHeader, []byte(want), 0o644))
	}
	got, err := os.ReadFile(paramsHeader)
	require.NoError(t, err)
	assert.Equal(t, want, string(got), "cuda/moe_params.h is stale: run go generate ./go/backend/cuda, then make ptx")
}

// The header's static_asserts, which clang checks when it builds the PTX,
// state Go's offset of every field and Go's size and alignment of every
// struct.
func TestKernelParamsHeaderStatesGoLayout(t *testing.T) {
	b, err := os.ReadFile(paramsHeader)
	require.NoError(t, err)
	h := string(b)
	offsets := map[string]map[string]uintptr{}
	for _, m := range regexp.MustCompile(`static_assert\(__builtin_offsetof\((\w+), (\w+)\) == (\d+),`).FindAllStringSubmatch(h, -1) {
		n, _ := strconv.Atoi(m[3])
		if offsets[m[1]] == nil {
			offsets[m[1]] = map[string]uintptr{}
		}
		offsets[m[1]][m[2]] = uintptr(n)
	}
	sizes := map[string]uintptr{}
	for _, m := range regexp.MustCompile(`static_assert\(sizeof\((\w+)\) == (\d+),`).FindAllStringSubmatch(h, -1) {
		n, _ := strconv.Atoi(m[2])
		sizes[m[1]] = uintptr(n)
	}
	goSizes := map[string]uintptr{
		"moe_gate_up_params":        unsafe.Sizeof(gateUpParams{}),
		"moe_down_params":           unsafe.Sizeof(downParams{}),
		"moe_gptoss_gate_up_params": unsafe.Sizeof(gptOssGateUpParams{}),
		"moe_gptoss_down_params":    unsafe.Sizeof(gptOssDownParams{}),
	}
	assert.Equal(t, goSizes, sizes, "each struct's size, as unsafe.Sizeof gives it")
	require.Len(t, kernelParamStructs, len(goSizes))
	for _, s := range kernelParamStructs {
		t.Run(s.c, func(t *testing.T) {
			assert.Contains(t, h, "static_assert(alignof("+s.c+") == 8,", "8-byte aligned")
			require.Len(t, offsets[s.c], s.goType.NumField(), "an offset assert for every field")
			for i := range s.goType.NumField() {
				f := s.goType.Field(i)
				off, ok := offsets[s.c][cFieldName(f.Name)]
				require.True(t, ok, "field %s", f.Name)
				assert.Equal(t, f.Offset, off, "field %s", f.Name)
				assert.Equal(t, uintptr(8*i), off, "field %s: 8 bytes a field, no padding", f.Name)
			}
		})
	}
	// unsafe.Offsetof, for a field of each struct, agrees with the
	// reflection the generator reads.
	assert.Equal(t, unsafe.Offsetof(gateUpParams{}.UpRow0), offsets["moe_gate_up_params"]["up_row0"])
	assert.Equal(t, unsafe.Offsetof(downParams{}.DownScaleTab), offsets["moe_down_params"]["down_scale_tab"])
	assert.Equal(t, unsafe.Offsetof(gptOssGateUpParams{}.LimitBits), offsets["moe_gptoss_gate_up_params"]["limit_bits"])
	assert.Equal(t, unsafe.Offsetof(gptOssDownParams{}.WDType), offsets["moe_gptoss_down_params"]["wdtype"])
}

// Each FFN kernel takes its struct as one by-value parameter of the Go
// struct's size, in both PTX builds: what cuLaunchKernel copies from the
// one pointer the launch passes.
func TestKernelParamsMatchThePTX(t *testing.T) {
	n := 0
	for _, s := range kernelParamStructs {
		for _, k := range s.kernels {
			n++
			for build, ptx := range map[string]string{BuildSM80: moeFFNPTX, BuildSM89: moeFFNSM89PTX} {
				m := regexp.MustCompile(`(?s)\.visible \.entry ` + k + `\((.*?)\)`).FindStringSubmatch(ptx)
				require.NotNil(t, m, "%s in the %s build", k, build)
				assert.Regexp(t, `^\s*\.param \.align 8 \.b8 `+k+`_param_0\[`+strconv.Itoa(int(s.goType.Size()))+`\]\s*$`, m[1],
					"%s (%s build) takes one %d-byte %s", k, build, s.goType.Size(), s.c)
			}
		}
	}
	assert.Equal(t, 8, n, "the eight FFN kernels")
}

// A field that is not 8 bytes would need padding rules shared by Go and
// clang; the generator refuses it.
func TestKernelParamsHeaderRefusesOtherFields(t *testing.T) {
	saved := kernelParamStructs
	t.Cleanup(func() { kernelParamStructs = saved })
	kernelParamStructs = []paramStruct{{"bad", reflect.TypeFor[struct {
		A uint64
		B int32
	}](), []string{"k"}}}
	_, err := kernelParamsHeader()
	assert.ErrorContains(t, err, "B is int32: fields are uint64 (addresses) or int64")
}

func TestCFieldName(t *testing.T) {
	for in, want := range map[string]string{
		"X": "x", "TopK": "top_k", "GateTab": "gate_tab", "DType": "dtype", "WDType": "wdtype",
		"UpRow0": "up_row0", "GateUpTab": "gate_up_tab", "P": "p", "AlphaBits": "alpha_bits",
	} {
		assert.Equal(t, want, cFieldName(in), in)
	}
}
