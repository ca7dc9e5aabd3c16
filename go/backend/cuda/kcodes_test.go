package cuda

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/backend"
	"github.com/moe-infinity/moe_infinity/go/dtype"
)

// The kernels' codes (cuda/moe_ffn.cu: dtype 0 bfloat16, 1 float16;
// wdtype 0 bfloat16, 1 float16, 2 float32), and errors, never a default,
// for any other type.
func TestKernelDTypes(t *testing.T) {
	tests := []struct {
		name         string
		act, weights dtype.DType
		wantAct      int64
		wantWeights  int64
		err          string
	}{
		{"bfloat16, float32 weights", dtype.BF16, dtype.F32, 0, 2, ""},
		{"bfloat16, bfloat16 weights", dtype.BF16, dtype.BF16, 0, 0, ""},
		{"float16, float16 weights", dtype.F16, dtype.F16, 1, 1, ""},
		{"float16, bfloat16 weights", dtype.F16, dtype.BF16, 1, 0, ""},
		{"float32 activations", dtype.F32, dtype.F32, 0, 0, "take BF16 or F16 activations, not F32"},
		{"unset activations", dtype.Invalid, dtype.F32, 0, 0, "not Invalid"},
		{"unset routing weights", dtype.BF16, dtype.Invalid, 0, 0, "F32, BF16 or F16 routing weights, not Invalid"},
		{"float64 routing weights", dtype.F16, dtype.F64, 0, 0, "routing weights, not F64"},
		{"out-of-range routing weights", dtype.F16, dtype.DType(200), 0, 0, "not DType(200)"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			act, w, err := kernelDTypes(backend.FFNArgs{DType: tc.act, WDType: tc.weights})
			if tc.err != "" {
				require.ErrorContains(t, err, tc.err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, [2]int64{tc.wantAct, tc.wantWeights}, [2]int64{act, w})
		})
	}
}
