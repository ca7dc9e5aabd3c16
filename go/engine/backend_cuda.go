//go:build cuda

package engine

import (
	"fmt"

	"github.com/moe-infinity/moe_infinity/go/backend"
	"github.com/moe-infinity/moe_infinity/go/backend/cuda"
)

// newAcceleratorBackend creates the CUDA backend on Config.Device, loading
// the kernels of Config.KernelBuild.
func newAcceleratorBackend(cfg Config) (backend.Backend, error) {
	if cfg.Backend != "cuda" {
		return nil, fmt.Errorf("%w: unknown backend %q (supported: cpu, cuda)", ErrInvalid, cfg.Backend)
	}
	return cuda.New(cuda.Config{Device: cfg.Device, KernelBuild: cfg.KernelBuild}), nil
}
