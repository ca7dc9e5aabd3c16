package engine

import (
	"fmt"

	"github.com/moe-infinity/moe_infinity/go/dtype"
)

// The C ABI's dtype codes (capi/moe_infinity.h): the engine works with
// dtype.DType and translates at the ABI, here and only here. Code -1
// ("another type") is dtype.Invalid: the executor then runs the caller's
// code.

// ActivationDType is the activation type of C ABI code c (moe_layer_args'
// dtype, moe_layer_ffn's dtype): 0 bfloat16, 1 float16, -1 another type
// (dtype.Invalid); any other code is an error.
func ActivationDType(c int32) (dtype.DType, error) {
	switch c {
	case 0:
		return dtype.BF16, nil
	case 1:
		return dtype.F16, nil
	case -1:
		return dtype.Invalid, nil
	}
	return dtype.Invalid, fmt.Errorf("%w: dtype %d (0 bfloat16, 1 float16, -1 other)", ErrInvalid, c)
}

// ActivationCode is dt's C ABI code (0 bfloat16, 1 float16, -1 any other
// type): moe_ffn_shape's dtype and the plan's executor "dtype".
func ActivationCode(dt dtype.DType) int32 {
	switch dt {
	case dtype.BF16:
		return 0
	case dtype.F16:
		return 1
	}
	return -1
}

// RoutingWeightsDType is the routing-weight type of C ABI code c
// (moe_layer_args' weights_dtype): 0 float32, 1 bfloat16, 2 float16, -1
// another type (dtype.Invalid); any other code is an error.
func RoutingWeightsDType(c int32) (dtype.DType, error) {
	switch c {
	case 0:
		return dtype.F32, nil
	case 1:
		return dtype.BF16, nil
	case 2:
		return dtype.F16, nil
	case -1:
		return dtype.Invalid, nil
	}
	return dtype.Invalid, fmt.Errorf("%w: weights_dtype %d (0 float32, 1 bfloat16, 2 float16, -1 other)", ErrInvalid, c)
}
