package backend

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestFeaturesOf(t *testing.T) {
	for _, tc := range []struct {
		name string
		be   Backend
		want [9]bool // Kernels, Mapped, Graphs, CopyGraphs, Ordered, Timed, LinkMeter, HandOff, CopyHandOff
	}{
		// The CPU backend stands in for a device in tests: reference
		// kernels, mapped mode, graphs and the (trivial) hand-offs, eager and
		// in copy mode, but no link to measure.
		{"cpu", NewCPU(1), [9]bool{true, true, true, true, false, false, false, true, true}},
		{"only the required methods", bare{NewCPU(1)}, [9]bool{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := FeaturesOf(tc.be)
			got := [9]bool{f.Kernels != nil, f.Mapped != nil, f.Graphs != nil, f.CopyGraphs != nil, f.Ordered != nil, f.Timed != nil, f.LinkMeter != nil, f.HandOff != nil, f.CopyHandOff != nil}
			assert.Equal(t, tc.want, got)
		})
	}
}

// bare hides every optional part of a backend behind the Backend
// interface alone.
type bare struct{ Backend }
