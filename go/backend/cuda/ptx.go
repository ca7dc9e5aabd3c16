package cuda

// This file holds the kernels' two PTX builds and the choice between them.
// It has no build tag (and no cgo), so that its tests run in the CPU build,
// on a machine without a GPU.

import (
	_ "embed"
	"fmt"
	"strings"

	"github.com/moe-infinity/moe_infinity/go/backend"
)

// moeFFNPTX is cuda/moe_ffn.cu built for sm_80 (PTX ISA 7.0): every GPU from
// the A100 on; FP8 weights decoded in software.
//
//go:embed moe_ffn.ptx
var moeFFNPTX string

// moeFFNSM89PTX is the same source built for sm_89 (PTX ISA 8.1): Ada,
// Hopper and later; the FP8 row dot decodes e4m3 with the hardware's
// cvt.rn.f16x2.e4m3x2, with results bit for bit the sm_80 build's.
//
//go:embed moe_ffn_sm89.ptx
var moeFFNSM89PTX string

// Kernel build names (Config.KernelBuild, engine option kernel_build).
const (
	// BuildSM80 is the sm_80 build, the default.
	BuildSM80 = "sm80"
	// BuildSM89 is the sm_89 build, for devices of compute capability 8.9
	// and higher. Opt-in: it has not yet run on a GPU.
	BuildSM89 = "sm89"
)

// KernelBuilds lists the kernel build names; the first is the default.
var KernelBuilds = []string{BuildSM80, BuildSM89}

// kernelBuild is one PTX build: its text and the compute capability it
// needs (major*10 + minor).
type kernelBuild struct {
	ptx    string
	minCap int
	target string // the PTX's .target, for errors and tests
}

var kernelBuilds = map[string]kernelBuild{
	BuildSM80: {moeFFNPTX, 80, "sm_80"},
	BuildSM89: {moeFFNSM89PTX, 89, "sm_89"},
}

// normBuild is build with "" read as the default.
func normBuild(build string) string {
	if build == "" {
		return KernelBuilds[0]
	}
	return build
}

// selectPTX returns the PTX of the named build ("" = the default) for a
// device of compute capability major.minor, or an error naming the build,
// the device's capability and what it needs (ErrUnsupportedDevice when
// the device is too old for the build: backend.ErrUnsupported).
func selectPTX(build string, major, minor int) (string, error) {
	build = normBuild(build)
	kb, ok := kernelBuilds[build]
	if !ok {
		return "", fmt.Errorf("backend cuda: unknown kernel build %q (supported: %s)", build, strings.Join(KernelBuilds, ", "))
	}
	if cc := major*10 + minor; cc < kb.minCap {
		return "", fmt.Errorf("%w: kernel_build %q (%s PTX) needs a GPU of compute capability %d.%d or higher; this device is %d.%d (use kernel_build %q)",
			backend.ErrUnsupported, build, kb.target, kb.minCap/10, kb.minCap%10, major, minor, BuildSM80)
	}
	return kb.ptx, nil
}
