package engine

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/backend"
	"github.com/moe-infinity/moe_infinity/go/backend/cuda"
)

// The engine checks kernel_build against its own list, so that the CPU
// build does not link the kernels; it must be the CUDA backend's.
func TestKernelBuildNamesAreTheCUDABackends(t *testing.T) {
	assert.Equal(t, cuda.KernelBuilds, KernelBuilds)
	assert.Equal(t, cuda.BuildSM80, KernelBuilds[0], "sm80 is the default until sm89 has run on a GPU")
}

// buildBackend is the CPU backend standing in for the CUDA one: it reports
// the kernel build it was given, and fails Open as the CUDA backend does on
// a device too old for it when openErr is set.
type buildBackend struct {
	*backend.CPU
	build   string
	openErr error
}

func (b buildBackend) Capabilities() backend.Capabilities {
	return backend.Capabilities{KernelBuild: b.build}
}

func (b buildBackend) Open(slots int, slotBytes int64, src backend.Source) error {
	if b.openErr != nil {
		return b.openErr
	}
	return b.CPU.Open(slots, slotBytes, src)
}

func TestPlanSaysWhichKernelBuildWasLoaded(t *testing.T) {
	tooOld := fmt.Errorf(`device 0 (NVIDIA A100): %w: kernel_build "sm89" (sm_89 PTX) needs a GPU of compute capability 8.9 or higher; this device is 8.0`, backend.ErrUnsupported)
	for _, tc := range []struct {
		name    string
		json    string // the engine config
		fake    bool   // a backend with kernels (buildBackend) instead of the CPU one
		openErr error
		want    string // Plan.KernelBuild
		err     error
	}{
		{"cpu backend loads no kernels", `{"budget_bytes": 1048576}`, false, nil, "none", nil},
		{"cpu backend ignores the setting", `{"budget_bytes": 1048576, "kernel_build": "sm89"}`, false, nil, "none", nil},
		{"default build", `{"budget_bytes": 1048576, "backend": "cuda"}`, true, nil, "sm80", nil},
		{"sm80", `{"budget_bytes": 1048576, "backend": "cuda", "kernel_build": "sm80"}`, true, nil, "sm80", nil},
		{"sm89", `{"budget_bytes": 1048576, "backend": "cuda", "kernel_build": "sm89"}`, true, nil, "sm89", nil},
		{"sm89 on an older device", `{"budget_bytes": 1048576, "backend": "cuda", "kernel_build": "sm89"}`, true, tooOld, "", ErrUnsupported},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := ParseConfig([]byte(tc.json))
			require.NoError(t, err)
			e, err := New(cfg)
			require.NoError(t, err)
			defer e.Close()
			var given string
			if tc.fake {
				e.NewBackend = func(c Config) (backend.Backend, error) {
					given = c.KernelBuild
					return buildBackend{backend.NewCPU(1), c.KernelBuild, tc.openErr}, nil
				}
			}
			model(t, e, 1, 2)
			p, err := e.Configure(Setup{Layout: mixtralSpec})
			if tc.err != nil {
				require.ErrorIs(t, err, tc.err)
				assert.NotErrorIs(t, err, ErrBudget, "not a memory problem")
				assert.ErrorContains(t, err, "this device is 8.0", "the error names the device's compute capability")
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, p.KernelBuild)
			if tc.fake {
				assert.Equal(t, tc.want, given, "the backend was asked for the configured build")
			}
		})
	}
}
