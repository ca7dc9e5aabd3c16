package backend

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// An expert evicted from one slot and loaded into another before the copy
// that replaces it in the first begins stays mapped where it now is.
func TestUnmapKeepsAnExpertMappedElsewhere(t *testing.T) {
	m, err := NewMapTable(MappedLayout{}, 3, 1, 4, func(int, int) (HostRows, bool) { return HostRows{}, true })
	require.NoError(t, err)
	for _, tc := range []struct {
		name      string
		remap     bool // expert 2 mapped again, to slot 1, before slot 0's next copy
		wantOwner int
		wantSlot  int32
	}{
		{"still in its slot", false, 2, -1},
		{"mapped elsewhere since", true, -1, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m.Unmap(0)
			m.Unmap(1)
			m.Map(0, 2)
			if tc.remap {
				m.Map(1, 2)
			}
			assert.Equal(t, tc.wantOwner, m.Unmap(0), "the expert to point back at host memory")
			assert.Equal(t, -1, m.Owner[0])
			assert.Equal(t, tc.wantSlot, m.Resident[2])
			assert.Equal(t, tc.remap, m.Snapshot(0)[2])
			assert.Equal(t, -1, m.Unmap(0), "an empty slot unmaps nothing")
		})
	}
}
