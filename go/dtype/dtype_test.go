package dtype

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestParse(t *testing.T) {
	tests := []struct {
		in   string
		want DType
	}{
		{"F64", F64}, {"F32", F32}, {"F16", F16}, {"BF16", BF16},
		{"I64", I64}, {"I32", I32}, {"I16", I16}, {"I8", I8}, {"U8", U8},
		{"BOOL", Bool}, {"F8_E4M3", F8E4M3}, {"F8_E5M2", F8E5M2},
		{"U16", U16}, {"U32", U32}, {"U64", U64},
		{"float32", F32}, {"torch.float32", F32}, {"Float32", F32}, {"TORCH.FLOAT32", F32},
		{"float", F32}, {"float16", F16}, {"half", F16}, {"torch.float16", F16},
		{"bfloat16", BF16}, {"torch.bfloat16", BF16}, {"BFloat16", BF16},
		{"float64", F64}, {"double", F64}, {"int64", I64}, {"long", I64},
		{"int32", I32}, {"int", I32}, {"int16", I16}, {"short", I16}, {"int8", I8},
		{"uint8", U8}, {"bool", Bool}, {"torch.bool", Bool},
		{"float8_e4m3fn", F8E4M3}, {"float8_e5m2", F8E5M2},
		{"uint16", U16}, {"uint32", U32}, {"uint64", U64},
		{" torch.bfloat16 ", BF16},
	}
	for _, tc := range tests {
		t.Run(tc.in, func(t *testing.T) {
			got, err := Parse(tc.in)
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
		})
	}
}

func TestParseErrors(t *testing.T) {
	for _, in := range []string{"", "bf16", "f32", "Bf16", "F8_E4M3FN", "torch.", "complex64", "float8_e4m3", "Invalid", "invalid"} {
		t.Run(in, func(t *testing.T) {
			d, err := Parse(in)
			require.Error(t, err)
			assert.Equal(t, Invalid, d)
			require.ErrorContains(t, err, `"`+in+`"`)
			require.ErrorContains(t, err, "BF16")
			require.ErrorContains(t, err, "float16")
			var ue *UnknownError
			require.True(t, errors.As(err, &ue))
			assert.Equal(t, in, ue.Name)
		})
	}
}

func TestParseSafetensors(t *testing.T) {
	for d := F32; d < numDTypes; d++ {
		got, err := ParseSafetensors(d.String())
		require.NoError(t, err)
		assert.Equal(t, d, got)
	}
	for _, in := range []string{"float32", "bf16", "Invalid", "", "bool"} {
		_, err := ParseSafetensors(in)
		require.ErrorContains(t, err, `"`+in+`"`)
	}
}

func TestProperties(t *testing.T) {
	tests := []struct {
		d       DType
		st      string
		torch   string
		size    int
		isFloat bool
	}{
		{Invalid, "Invalid", "invalid", 0, false},
		{F32, "F32", "float32", 4, true},
		{F16, "F16", "float16", 2, true},
		{BF16, "BF16", "bfloat16", 2, true},
		{F64, "F64", "float64", 8, false},
		{I64, "I64", "int64", 8, false},
		{I32, "I32", "int32", 4, false},
		{I16, "I16", "int16", 2, false},
		{I8, "I8", "int8", 1, false},
		{U8, "U8", "uint8", 1, false},
		{Bool, "BOOL", "bool", 1, false},
		{F8E4M3, "F8_E4M3", "float8_e4m3fn", 1, false},
		{F8E5M2, "F8_E5M2", "float8_e5m2", 1, false},
		{U16, "U16", "uint16", 2, false},
		{U32, "U32", "uint32", 4, false},
		{U64, "U64", "uint64", 8, false},
		{DType(200), "DType(200)", "DType(200)", 0, false},
	}
	for _, tc := range tests {
		t.Run(tc.st, func(t *testing.T) {
			assert.Equal(t, tc.st, tc.d.String())
			assert.Equal(t, tc.torch, tc.d.TorchName())
			assert.Equal(t, tc.size, tc.d.Size())
			assert.Equal(t, tc.isFloat, tc.d.IsFloat())
			assert.Equal(t, tc.size != 0, tc.d.Valid())
			if tc.d.Valid() {
				back, err := Parse(tc.d.TorchName())
				require.NoError(t, err)
				assert.Equal(t, tc.d, back)
			}
		})
	}
}
