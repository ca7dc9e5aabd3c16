package backend

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestFeaturesOf(t *testing.T) {
	for _, tc := range []struct {
		name string
		be   Backend
		want [7]bool // Kernels, Mapped, Graphs, CopyGraphs, Ordered, Timed, LinkMeter
	}{
		// The CPU backend stands in for a device in tests: reference
		// kernels, mapped mode and graphs, but no link to measure.
		{"cpu", NewCPU(1), [7]bool{true, true, true, true, false, false, false}},
		{"only the required methods", bare{NewCPU(1)}, [7]bool{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := FeaturesOf(tc.be)
			got := [7]bool{f.Kernels != nil, f.Mapped != nil, f.Graphs != nil, f.CopyGraphs != nil, f.Ordered != nil, f.Timed != nil, f.LinkMeter != nil}
			assert.Equal(t, tc.want, got)
		})
	}
}

// bare hides every optional part of a backend behind the Backend
// interface alone.
type bare struct{ Backend }
