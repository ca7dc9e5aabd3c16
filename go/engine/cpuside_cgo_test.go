//go:build cgo

package engine

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/cpuffn"
)

func TestFastestISA(t *testing.T) {
	tests := []struct {
		name  string
		times map[cpuffn.ISA]float64
		want  cpuffn.ISA
	}{
		{"none timed", nil, cpuffn.Scalar},
		{"the shortest", map[cpuffn.ISA]float64{cpuffn.AVX2: 1, cpuffn.AVX512BF16: 1.2}, cpuffn.AVX2},
		{"the shortest, later in the list", map[cpuffn.ISA]float64{cpuffn.AVX2: 1.3, cpuffn.AVX512: 1.1, cpuffn.AVX512BF16: 1.2}, cpuffn.AVX512},
		{"ties go to the later", map[cpuffn.ISA]float64{cpuffn.AVX2: 1, cpuffn.AVX512BF16: 1}, cpuffn.AVX512BF16},
		{"one", map[cpuffn.ISA]float64{cpuffn.Scalar: 5}, cpuffn.Scalar},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			assert.Equal(t, tc.want, fastest(tc.times))
		})
	}
}

func TestSIMDMeasurePicksAKernelPerTokenCount(t *testing.T) {
	s := newCPUKernel(2).(*simdCPU)
	t.Cleanup(s.close)
	c, err := s.measure(64, 32, false)
	require.NoError(t, err)
	names := map[string]cpuffn.ISA{}
	for _, isa := range candidateISAs() {
		require.True(t, cpuffn.Supported(isa))
		names[isa.String()] = isa
	}
	require.Contains(t, names, c.ISAOne, "one token runs a measured instruction set this CPU has")
	require.Contains(t, names, c.ISAMany)
	assert.Equal(t, names[c.ISAOne], s.one.ISA())
	assert.Equal(t, names[c.ISAMany], s.many.ISA())
	assert.Same(t, s.one, s.kernel(1), "decode calls run the one-token kernel")
	assert.Same(t, s.many, s.kernel(4))
	if c.ISAOne == c.ISAMany {
		assert.Same(t, s.one, s.many, "one kernel when one instruction set wins both")
	}
	assert.Equal(t, 2, s.one.Threads(), "the threads carry over")
	assert.Equal(t, 2, s.many.Threads())
	s.setThreads(1)
	assert.Equal(t, 1, s.one.Threads())
	assert.Equal(t, 1, s.many.Threads())
	assert.Positive(t, c.CPUGBps)
	assert.True(t, c.CPUShare > 0 && c.CPUShare <= 1)
}
