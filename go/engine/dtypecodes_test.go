package engine

import (
	"encoding/json"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/dtype"
)

// The C ABI's codes (capi/moe_infinity.h) both ways; a code outside them
// is ErrInvalid, never a default type.
func TestABIDTypeCodes(t *testing.T) {
	tests := []struct {
		name    string
		code    int32
		act     dtype.DType
		actErr  bool
		wts     dtype.DType
		wtsErr  bool
		abiCode int32 // ActivationCode(act)
	}{
		{"0", 0, dtype.BF16, false, dtype.F32, false, 0},
		{"1", 1, dtype.F16, false, dtype.BF16, false, 1},
		{"2: weights only", 2, dtype.Invalid, true, dtype.F16, false, -1},
		{"-1: another type", -1, dtype.Invalid, false, dtype.Invalid, false, -1},
		{"3", 3, dtype.Invalid, true, dtype.Invalid, true, -1},
		{"-2", -2, dtype.Invalid, true, dtype.Invalid, true, -1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			act, err := ActivationDType(tc.code)
			if tc.actErr {
				require.ErrorIs(t, err, ErrInvalid)
				assert.ErrorContains(t, err, "0 bfloat16, 1 float16, -1 other")
			} else {
				require.NoError(t, err)
			}
			assert.Equal(t, tc.act, act)
			assert.Equal(t, tc.abiCode, ActivationCode(act))
			wts, err := RoutingWeightsDType(tc.code)
			if tc.wtsErr {
				require.ErrorIs(t, err, ErrInvalid)
				assert.ErrorContains(t, err, "0 float32, 1 bfloat16, 2 float16, -1 other")
			} else {
				require.NoError(t, err)
			}
			assert.Equal(t, tc.wts, wts)
		})
	}
	assert.Equal(t, int32(-1), ActivationCode(dtype.F32), "no ABI code for float32 activations")
}

// The plan's executor "dtype" is the C ABI's code, which the caller
// passes back with its activations.
func TestExecutorPlanJSONHasTheABICode(t *testing.T) {
	for _, tc := range []struct {
		dt   dtype.DType
		want float64
	}{{dtype.BF16, 0}, {dtype.F16, 1}, {dtype.Invalid, -1}} {
		b, err := json.Marshal(ExecutorPlan{Kernels: tc.dt != dtype.Invalid, DType: tc.dt, Hidden: 8})
		require.NoError(t, err)
		var doc map[string]any
		require.NoError(t, json.Unmarshal(b, &doc))
		assert.Equal(t, tc.want, doc["dtype"], tc.dt.String())
		assert.Equal(t, float64(8), doc["hidden"], "the other fields as tagged")
		assert.Equal(t, tc.dt != dtype.Invalid, doc["kernels"])
	}
}
