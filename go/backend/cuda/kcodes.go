package cuda

// This file has no build tag, so that the CPU build's tests check the
// translation.

import (
	"fmt"

	"github.com/moe-infinity/moe_infinity/go/backend"
	"github.com/moe-infinity/moe_infinity/go/dtype"
)

// kernelDTypes translates a's activation and routing-weight types into the
// FFN kernels' own codes (cuda/moe_ffn.cu): act is the kernels' dtype
// parameter (0 bfloat16, 1 float16) and weights their wdtype parameter
// (0 bfloat16, 1 float16, 2 float32). It is the only place the Go side
// states those codes; any other type is an error, never a default.
func kernelDTypes(a backend.FFNArgs) (act, weights int64, err error) {
	switch a.DType {
	case dtype.BF16:
		act = 0
	case dtype.F16:
		act = 1
	default:
		return 0, 0, fmt.Errorf("backend cuda: the expert kernels take BF16 or F16 activations, not %s", a.DType)
	}
	switch a.WDType {
	case dtype.BF16:
		weights = 0
	case dtype.F16:
		weights = 1
	case dtype.F32:
		weights = 2
	default:
		return 0, 0, fmt.Errorf("backend cuda: the expert kernels take F32, BF16 or F16 routing weights, not %s", a.WDType)
	}
	return act, weights, nil
}
