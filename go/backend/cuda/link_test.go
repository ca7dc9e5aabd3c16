//go:build cuda

package cuda

// These tests need a CUDA driver and a GPU. They cannot skip without one:
// package cu initialises the driver as the test binary starts and exits
// with an error where there is none. Build the binary on any machine and
// run it on the GPU machine:
//
//	CGO_CFLAGS="-I$PWD/build/cuda/include -Wno-deprecated-declarations" CGO_LDFLAGS="-L$PWD/build/cuda/lib" \
//	    go test -c -tags cuda -o build/cuda_backend.test ./go/backend/cuda
//	./build/cuda_backend.test -test.v     # on the GPU machine

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/backend"
)

// zeroSource is one layer of one expert of zeros, staged (no segments).
type zeroSource struct{ n int64 }

func (s zeroSource) SlotBytes() int64 { return s.n }
func (s zeroSource) Fill(_, _ int, dst []byte) error {
	clear(dst[:s.n])
	return nil
}
func (s zeroSource) Guard(read func() error) error               { return read() }
func (s zeroSource) Segments(_, _ int) ([]backend.Segment, bool) { return nil, false }
func (s zeroSource) Shape() (int, int)                           { return 1, 1 }

func TestMeasureLinkGivesTheRatesOfAPCIeOrNVLinkLink(t *testing.T) {
	b := New(Config{})
	_, err := b.MeasureLink()
	require.Error(t, err, "before Open")
	require.NoError(t, b.Open(1, 4096, zeroSource{4096}))
	r, err := b.MeasureLink()
	require.NoError(t, err)
	t.Logf("dma %.1f GB/s, zero copy %.1f GB/s, reaction %.1f µs", r.DMAGBps, r.ZeroCopyGBps, r.ReactionUs)
	// Bounds any host link has (PCIe Gen3 x4 to NVLink-C2C): loose, they
	// catch a unit or timing error, not a slow machine.
	assert.True(t, r.DMAGBps > 1 && r.DMAGBps < 1000, "dma_gbps %v", r.DMAGBps)
	assert.True(t, r.ZeroCopyGBps > 1 && r.ZeroCopyGBps < 1000, "zero_copy_gbps %v", r.ZeroCopyGBps)
	assert.True(t, r.ReactionUs > 0 && r.ReactionUs < 1e5, "reaction_us %v", r.ReactionUs)
	free, _, err := b.dev.memInfo()
	require.NoError(t, err)
	again, err := b.MeasureLink()
	require.NoError(t, err, "a second measurement on the same backend")
	after, _, err := b.dev.memInfo()
	require.NoError(t, err)
	assert.InDelta(t, float64(free), float64(after), 4<<20, "the probe's device memory is freed")
	assert.Positive(t, again.DMAGBps)
	require.NoError(t, b.Close())
	_, err = b.MeasureLink()
	assert.ErrorIs(t, err, backend.ErrClosed)
}
