package trace

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestLayerWeightIsThePapersProximity(t *testing.T) {
	tests := []struct {
		layer, layers int
		want          float64
	}{
		{0, 4, 1}, {1, 4, 0.75}, {2, 4, 0.5}, {3, 4, 0.25}, {47, 48, 1.0 / 48},
	}
	for _, tc := range tests {
		assert.InDelta(t, tc.want, LayerWeight(tc.layer, tc.layers), 1e-15, "layer %d of %d", tc.layer, tc.layers)
	}
}

func TestPrioritiesAreTokenSharesWithAnEpsilonFloor(t *testing.T) {
	row := make([]float64, 3)
	Priorities(row, []float32{3, 1, 0}, 4, 2, 4)
	assert.InDeltaSlice(t, []float64{(3 + Epsilon) / 4 * 0.5, (1 + Epsilon) / 4 * 0.5, Epsilon / 4 * 0.5}, row, 1e-12)
	Priorities(row, nil, 0, 0, 4)
	assert.Equal(t, []float64{Epsilon, Epsilon, Epsilon}, row, "no tokens yet: the floor")
}
