//go:build !cuda

package engine

import (
	"fmt"

	"github.com/moe-infinity/moe_infinity/go/backend"
)

// newAcceleratorBackend reports that this build has only the CPU backend.
func newAcceleratorBackend(cfg Config) (backend.Backend, error) {
	return nil, fmt.Errorf("%w: backend %q is not available in this build of the engine (CPU build; supported: cpu)", ErrInvalid, cfg.Backend)
}
