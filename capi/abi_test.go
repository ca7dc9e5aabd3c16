package main

import (
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/engine"
)

var (
	headerFunc = regexp.MustCompile(`(?s)\bint32_t\s+(moe_\w+)\s*\(([^)]*)\)\s*;`)
	exportLine = regexp.MustCompile(`(?m)^//export (moe_\w+)\nfunc moe_\w+\(([^)]*)\)`)
	defineLine = regexp.MustCompile(`(?m)^#define (MOE_(?:OK|ERR_\w+)) (\d+)`)
	layerLine  = regexp.MustCompile(`(?m)^#define (MOE_(?:PATH|LAYER)_\w+) (\d+)`)
	gapLine    = regexp.MustCompile(`(?m)^#define MOE_ROUTING_GAP (-?\d+)$`)
)

func countParams(list string) int {
	list = strings.TrimSpace(list)
	if list == "" || list == "void" {
		return 0
	}
	return strings.Count(list, ",") + 1
}

// TestHeaderMatchesExports fails when capi/moe_infinity.h drifts from the
// //export declarations: same functions, same number of parameters.
func TestHeaderMatchesExports(t *testing.T) {
	h, err := os.ReadFile("moe_infinity.h")
	require.NoError(t, err)
	header := map[string]int{}
	for _, m := range headerFunc.FindAllStringSubmatch(string(h), -1) {
		header[m[1]] = countParams(m[2])
	}
	files, err := filepath.Glob("*.go")
	require.NoError(t, err)
	exports := map[string]int{}
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		src, err := os.ReadFile(f)
		require.NoError(t, err)
		for _, m := range exportLine.FindAllStringSubmatch(string(src), -1) {
			// Go groups parameters: "a, b *C.char" is two parameters.
			exports[m[1]] = countParams(m[2])
		}
	}
	require.NotEmpty(t, exports)
	assert.Equal(t, keys(exports), keys(header), "exported functions vs header declarations")
	for name, n := range exports {
		assert.Equal(t, n, header[name], "parameter count of %s", name)
	}
}

// TestHeaderStatusCodes checks the #define'd status codes against the Go
// constants.
func TestHeaderStatusCodes(t *testing.T) {
	h, err := os.ReadFile("moe_infinity.h")
	require.NoError(t, err)
	got := map[int]string{}
	for _, m := range defineLine.FindAllStringSubmatch(string(h), -1) {
		n, _ := strconv.Atoi(m[2])
		got[n] = m[1]
	}
	want := map[int]string{}
	for s, name := range engine.StatusNames {
		want[int(s)] = name
	}
	assert.Equal(t, want, got)
}

// TestHeaderExecutorCodes checks the MOE_PATH_* and MOE_LAYER_* values and
// MOE_ROUTING_GAP of the header against the engine's Path, LayerFlags and
// RoutingGap.
func TestHeaderExecutorCodes(t *testing.T) {
	h, err := os.ReadFile("moe_infinity.h")
	require.NoError(t, err)
	got := map[string]int{}
	for _, m := range layerLine.FindAllStringSubmatch(string(h), -1) {
		n, _ := strconv.Atoi(m[2])
		got[m[1]] = n
	}
	want := map[string]int{}
	for name, p := range pathDefines {
		want[name] = int(p)
	}
	for name, f := range flagDefines {
		want[name] = int(f)
	}
	assert.Equal(t, want, got)
	m := gapLine.FindStringSubmatch(string(h))
	require.NotNil(t, m, "MOE_ROUTING_GAP")
	gap, _ := strconv.Atoi(m[1])
	assert.Equal(t, engine.RoutingGap, gap)
}

func keys(m map[string]int) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
