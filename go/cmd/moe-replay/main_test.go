package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

var tiny = []string{"-layers", "6", "-experts", "4", "-topk", "2", "-requests", "4", "-tokens", "4", "-clusters", "2", "-skew", "1.5", "-seed", "3"}

func TestRunPrintsATableAndWritesJSON(t *testing.T) {
	path := filepath.Join(t.TempDir(), "out.json")
	var out, errb bytes.Buffer
	code := run(append(tiny, "-cache-frac", "0.5,1", "-json", path, "-confidence", "-1", "-min-evidence", "-1", "-matches", "2", "-eamc", "3", "-prefetch-per-layer", "1"), &out, &errb)
	require.Equal(t, 0, code, errb.String())
	assert.Contains(t, out.String(), "trace: generated: L=6 E=4 k=2 requests=4 tokens=4 clusters=2 skew=1.5 seed=3")
	assert.Contains(t, out.String(), "belady-optimal")
	assert.Empty(t, errb.String())

	b, err := os.ReadFile(path)
	require.NoError(t, err)
	var rep struct {
		Label  string         `json:"label"`
		Params map[string]any `json:"params"`
		Runs   []struct {
			CacheFrac float64          `json:"cache_frac"`
			Slots     int              `json:"slots"`
			Results   []map[string]any `json:"results"`
		} `json:"runs"`
	}
	require.NoError(t, json.Unmarshal(b, &rep))
	assert.Contains(t, rep.Label, "generated:")
	assert.Equal(t, 1.5, rep.Params["skew"])
	require.Len(t, rep.Runs, 2)
	assert.Equal(t, 24, rep.Runs[1].Slots)
	assert.Len(t, rep.Runs[0].Results, 7)
}

func TestRunRejectsBadArguments(t *testing.T) {
	tests := []struct {
		name string
		args []string
		code int
		want string
	}{
		{"unknown flag", []string{"-nope"}, 2, "flag provided but not defined"},
		{"extra argument", append(tiny, "extra"), 2, "unexpected arguments"},
		{"bad fraction", append(tiny, "-cache-frac", "2"), 2, `cache fraction "2"`},
		{"bad params", append(tiny, "-topk", "9"), 2, "topk 9 exceeds the 4 experts"},
		{"cache too small", append(tiny, "-cache-frac", "0.01"), 1, "cannot hold one layer's 2 experts"},
		{"NaN confidence", append(tiny, "-confidence", "NaN"), 1, "prefetch confidence must be finite"},
		{"infinite evidence", append(tiny, "-min-evidence", "Inf"), 1, "prefetch min evidence must be finite"},
		{"unwritable json", append(tiny, "-cache-frac", "1", "-json", filepath.Join(t.TempDir(), "no", "such", "dir.json")), 1, "no such file"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var out, errb bytes.Buffer
			assert.Equal(t, tc.code, run(tc.args, &out, &errb))
			assert.Contains(t, errb.String(), tc.want)
		})
	}
}
