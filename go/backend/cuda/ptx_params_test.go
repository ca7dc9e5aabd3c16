package cuda

import (
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The Go launches of the kernels that take 8-byte parameters pass every
// one (cuLaunchKernel reads as many as the kernel declares, whatever it
// is given): the counts the launches in copymode.go and link.go pass, in
// both builds, within the launch helper's limit (MOE_MAX_PARAMS in
// driver.go). The FFN kernels take one struct instead
// (TestKernelParamsMatchThePTX). No GPU needed.
func TestKernelParameterCountsMatchTheLaunches(t *testing.T) {
	want := map[string]int{
		"moe_publish_wait": 19, // copy mode's 10, the CPU hand-off's 9
		"moe_answer":       4,
	}
	for _, ptx := range []string{moeFFNPTX, moeFFNSM89PTX} {
		for k, n := range want {
			m := regexp.MustCompile(`(?s)\.visible \.entry ` + k + `\((.*?)\)`).FindStringSubmatch(ptx)
			require.NotNil(t, m, k)
			assert.Equal(t, n, strings.Count(m[1], ".param"), k)
		}
	}
}

// Every kernel fits the launch helpers: a struct (the FFN kernels,
// kparams.go) or at most MOE_MAX_PARAMS (19) 8-byte parameters.
func TestEveryKernelFitsTheLaunchHelpers(t *testing.T) {
	structs := map[string]bool{}
	for _, s := range kernelParamStructs {
		for _, k := range s.kernels {
			structs[k] = true
		}
	}
	for _, ptx := range []string{moeFFNPTX, moeFFNSM89PTX} {
		entries := regexp.MustCompile(`(?s)\.visible \.entry (\w+)\((.*?)\)`).FindAllStringSubmatch(ptx, -1)
		require.Len(t, entries, len(kernelNames))
		for _, m := range entries {
			if structs[m[1]] {
				assert.Equal(t, 1, strings.Count(m[2], ".param"), "%s takes its struct", m[1])
				continue
			}
			assert.Equal(t, strings.Count(m[2], ".param"), strings.Count(m[2], ".param .u64"), "%s: 8-byte parameters", m[1])
			assert.LessOrEqual(t, strings.Count(m[2], ".param"), 19, "%s: within MOE_MAX_PARAMS (driver.go)", m[1])
		}
	}
}
