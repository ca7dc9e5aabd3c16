package cuda

import (
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The Go launches pass every kernel parameter (cuLaunchKernel reads as
// many as the kernel declares, whatever it is given): the counts the
// launches in ffn.go, copymode.go and link.go pass, in both builds. No GPU
// needed.
func TestKernelParameterCountsMatchTheLaunches(t *testing.T) {
	want := map[string]int{
		"moe_gate_up_swiglu": 12, // ... E, skip
		"moe_down":           14, // ... wdtype, addend, skip
		"moe_publish_wait":   19, // copy mode's 10, the CPU hand-off's 9
		"moe_answer":         4,
	}
	for _, ptx := range []string{moeFFNPTX, moeFFNSM89PTX} {
		for k, n := range want {
			m := regexp.MustCompile(`(?s)\.visible \.entry ` + k + `\((.*?)\)`).FindStringSubmatch(ptx)
			require.NotNil(t, m, k)
			assert.Equal(t, n, strings.Count(m[1], ".param"), k)
		}
	}
}
