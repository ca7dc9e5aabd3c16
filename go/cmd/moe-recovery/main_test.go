package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/sim"
)

func TestRunPrintsRecovery(t *testing.T) {
	tr, err := sim.Generate(sim.GenParams{Layers: 4, Experts: 8, TopK: 2, Requests: 10, TokensPerRequest: 16, Clusters: 2, Skew: 1.5, Seed: 1})
	require.NoError(t, err)
	var b bytes.Buffer
	require.NoError(t, sim.WriteTrace(&b, tr))
	path := filepath.Join(t.TempDir(), "t.json")
	require.NoError(t, os.WriteFile(path, b.Bytes(), 0o644))
	var out, errs bytes.Buffer
	code := run([]string{"-trace", path, "-switch", "5", "-window", "2"}, &out, &errs)
	require.Equal(t, 0, code, errs.String())
	var r sim.Recovery
	require.NoError(t, json.Unmarshal(out.Bytes(), &r))
	assert.Equal(t, 5, r.SwitchAt)
	assert.Len(t, r.WithPrefetch, 10)
	assert.Equal(t, 2, run([]string{"-trace", path, "-policy", "fifo"}, &out, &errs))
	assert.Equal(t, 2, run([]string{"-trace", filepath.Join(t.TempDir(), "none")}, &out, &errs))
	assert.Equal(t, 1, run([]string{"-trace", path, "-switch", "0"}, &out, &errs))
	assert.Equal(t, 2, run([]string{"-bogus"}, &out, &errs))
}
