package engine

import (
	"fmt"
	"slices"
	"strings"

	"github.com/moe-infinity/moe_infinity/go/dtype"
)

// The C ABI's dtype codes (capi/moe_infinity.h): the engine works with
// dtype.DType and translates at the ABI, here and only here. A code is its
// type's index in the tables below; code -1 ("another type") is
// dtype.Invalid: the executor then runs the caller's code.
var (
	// activationCodes are moe_layer_args' dtype, moe_layer_ffn's dtype
	// and moe_ffn_shape's: 0 bfloat16, 1 float16.
	activationCodes = []dtype.DType{dtype.BF16, dtype.F16}
	// routingWeightsCodes are moe_layer_args' weights_dtype: 0 float32, 1
	// bfloat16, 2 float16.
	routingWeightsCodes = []dtype.DType{dtype.F32, dtype.BF16, dtype.F16}
)

// ActivationDType is the activation type of C ABI code c (moe_layer_args'
// dtype, moe_layer_ffn's dtype): 0 bfloat16, 1 float16, -1 another type
// (dtype.Invalid); any other code is an error.
func ActivationDType(c int32) (dtype.DType, error) {
	return fromCode(activationCodes, c, "dtype")
}

// ActivationCode is dt's C ABI code (0 bfloat16, 1 float16, -1 any other
// type): moe_ffn_shape's dtype and the plan's executor "dtype".
func ActivationCode(dt dtype.DType) int32 {
	return int32(slices.Index(activationCodes, dt))
}

// RoutingWeightsDType is the routing-weight type of C ABI code c
// (moe_layer_args' weights_dtype): 0 float32, 1 bfloat16, 2 float16, -1
// another type (dtype.Invalid); any other code is an error.
func RoutingWeightsDType(c int32) (dtype.DType, error) {
	return fromCode(routingWeightsCodes, c, "weights_dtype")
}

// fromCode is the type of code c in codes (-1: dtype.Invalid), or an
// error naming the argument and the codes it takes.
func fromCode(codes []dtype.DType, c int32, arg string) (dtype.DType, error) {
	switch {
	case c == -1:
		return dtype.Invalid, nil
	case c >= 0 && int(c) < len(codes):
		return codes[c], nil
	}
	names := make([]string, 0, len(codes)+1)
	for i, dt := range codes {
		names = append(names, fmt.Sprintf("%d %s", i, dt.TorchName()))
	}
	return dtype.Invalid, fmt.Errorf("%w: %s %d (%s, -1 other)", ErrInvalid, arg, c, strings.Join(names, ", "))
}
