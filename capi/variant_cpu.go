//go:build !cuda

package main

import (
	"fmt"

	"github.com/moe-infinity/moe_infinity/go/engine"
)

// buildVariant names this build of the library.
const buildVariant = "cpu"

// deviceMemory is not available without the CUDA build.
func deviceMemory(int) (int64, int64, error) {
	return 0, 0, fmt.Errorf("%w: GPU memory queries need the CUDA build of the engine", engine.ErrUnsupported)
}
