//go:build !cuda

package engine

import (
	"testing"

	"github.com/stretchr/testify/require"
)

// The CPU build knows the "cuda" name but has no such backend: Configure
// says so.
func TestCUDABackendNotInCPUBuild(t *testing.T) {
	e, err := New(Config{BudgetBytes: 1 << 20, Backend: "cuda"})
	require.NoError(t, err)
	defer e.Close()
	model(t, e, 1, 1)
	_, err = e.Configure(Setup{Layout: mixtralSpec})
	require.ErrorIs(t, err, ErrInvalid)
	require.ErrorContains(t, err, `backend "cuda" is not available in this build`)
}
