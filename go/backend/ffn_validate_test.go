package backend

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/dtype"
)

// The expert FFN takes bfloat16/float16 activations and float32,
// bfloat16 or float16 routing weights; any other type (the zero value
// included) is an error naming it, on every backend, before anything runs.
func TestFFNArgsValidateDTypes(t *testing.T) {
	tests := []struct {
		name     string
		act, wts dtype.DType
		err      string
	}{
		{"bfloat16, float32 weights", dtype.BF16, dtype.F32, ""},
		{"bfloat16, bfloat16 weights", dtype.BF16, dtype.BF16, ""},
		{"float16, float16 weights", dtype.F16, dtype.F16, ""},
		{"float16, bfloat16 weights", dtype.F16, dtype.BF16, ""},
		{"activations unset", dtype.Invalid, dtype.F32, "activation dtype Invalid: the kernels take BF16 or F16"},
		{"float32 activations", dtype.F32, dtype.F32, "activation dtype F32"},
		{"FP8 activations", dtype.F8E4M3, dtype.F32, "activation dtype F8_E4M3"},
		{"routing weights unset", dtype.BF16, dtype.Invalid, "routing-weight dtype Invalid: the kernels take F32, BF16 or F16"},
		{"float64 routing weights", dtype.F16, dtype.F64, "routing-weight dtype F64"},
		{"out-of-range routing weights", dtype.BF16, dtype.DType(250), "routing-weight dtype DType(250)"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			a := FFNArgs{X: 1, Out: 1, Scratch: 1, TopK: 1, Weights: 1, T: 1, K: 1, Hidden: 4, Inter: 4,
				DType: tc.act, WDType: tc.wts, GateUp: []uint64{1}, Down: []uint64{1}}
			err := a.Validate()
			if tc.err != "" {
				require.ErrorContains(t, err, tc.err)
				assert.ErrorContains(t, NewCPU(1).ReferenceFFN(a), tc.err, "the reference refuses it before reading anything")
				return
			}
			require.NoError(t, err)
		})
	}
}
