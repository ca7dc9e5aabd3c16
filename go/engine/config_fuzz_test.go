package engine

import (
	"encoding/json"
	"errors"
	"math"
	"testing"
)

// FuzzParseConfig: the engine config arrives as JSON through the C ABI.
// Whatever the bytes, ParseConfig returns a config whose every field is in
// range, or an ErrInvalid error; never a panic. An accepted config parses
// again to itself (defaults are idempotent).
func FuzzParseConfig(f *testing.F) {
	for _, s := range []string{
		`{"budget_bytes": 1}`,
		`{"budget_bytes": 1048576, "policy": "LRU", "prefetch": false, "graph_misses": "copy"}`,
		`{"budget_bytes": 5, "graph_misses": " Auto ", "admit_margin": 0.5, "max_slots": 3}`,
		`{"budget_bytes": 5, "graph_misses": "dma"}`,
		`{"budget_bytes": -1}`,
		`{"budget_bytes": 1, "admit_margin": -2}`,
		`{"budget_bytes": 1, "unknown": 1}`,
		`[]`, `{`, ``,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := ParseConfig(b)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("error %v does not wrap ErrInvalid", err)
			}
			return
		}
		switch {
		case c.BudgetBytes <= 0, c.EAMCCapacity < 1, c.Matches < 1, c.PrefetchWindow < 1, c.Workers < 0, c.MaxSlots < 0:
			t.Fatalf("accepted out-of-range config %+v", c)
		case c.AdmitMargin == nil || *c.AdmitMargin < 0 || math.IsInf(*c.AdmitMargin, 0) || math.IsNaN(*c.AdmitMargin):
			t.Fatalf("accepted admit_margin %v", c.AdmitMargin)
		case c.Prefetch == nil:
			t.Fatal("prefetch default not filled in")
		case c.GraphMisses != "auto" && c.GraphMisses != "read" && c.GraphMisses != "copy":
			t.Fatalf("accepted graph_misses %q", c.GraphMisses)
		case c.Policy != "priority" && c.Policy != "lru" && c.Policy != "lfu":
			t.Fatalf("accepted policy %q", c.Policy)
		}
		again, err := json.Marshal(c)
		if err != nil {
			t.Fatal(err)
		}
		c2, err := ParseConfig(again)
		if err != nil {
			t.Fatalf("an accepted config does not parse again: %v (%s)", err, again)
		}
		if again2, _ := json.Marshal(c2); string(again2) != string(again) {
			t.Fatalf("defaults are not idempotent: %s then %s", again, again2)
		}
	})
}

// FuzzParseSetup: the setup JSON (module list and slot layout) never
// panics the parser; errors wrap ErrInvalid.
func FuzzParseSetup(f *testing.F) {
	for _, s := range []string{
		`{"layers": ["model.layers.0.block_sparse_moe"], "budget_bytes": 10}`,
		`{"layout": {"regions": []}}`,
		`{"layers": 3}`, `null`, `{`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if _, err := ParseSetup(b); err != nil && !errors.Is(err, ErrInvalid) {
			t.Fatalf("error %v does not wrap ErrInvalid", err)
		}
	})
}
