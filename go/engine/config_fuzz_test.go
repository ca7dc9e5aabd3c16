package engine

import (
	"bytes"
	"encoding/json"
	"errors"
	"math"
	"reflect"
	"slices"
	"testing"

	"github.com/stretchr/testify/require"
)

// trailers are appended to an accepted document: each must make it an
// error (one object, nothing after it).
var trailers = []string{"x", "}", "{}", " 0", "\x00", " null"}

// givenNames returns the name settings b gives as JSON strings (b is an
// accepted document), by JSON name.
func givenNames(t *testing.T, b []byte) map[string]string {
	var raw map[string]json.RawMessage
	require.NoError(t, json.Unmarshal(b, &raw), "accepted %q", b)
	out := map[string]string{}
	for _, s := range nameSettings {
		if r, ok := raw[s.key]; ok {
			var v string
			require.NoError(t, json.Unmarshal(r, &v), "accepted %s = %s", s.key, r)
			out[s.key] = v
		}
	}
	return out
}

// FuzzParseConfig: the engine config arrives as JSON through the C ABI.
// Whatever the bytes, ParseConfig returns a config whose every field is in
// range, or an ErrInvalid error; never a panic. A name setting is accepted
// only as one of its names spelled exactly, and an accepted one is what
// the input said (so " " can never become ""); an unset one is the
// default. The input is one object with nothing after it. An accepted
// config parses again to itself (defaults are idempotent).
func FuzzParseConfig(f *testing.F) {
	for _, s := range []string{
		`{"budget_bytes": 1}`,
		`{"budget_bytes": 1048576, "policy": "lru", "prefetch": false, "graph_misses": "copy", "backend": "cpu"}`,
		`{"budget_bytes": 5, "graph_misses": "auto", "admit_margin": 0.5, "max_slots": 3, "policy": "lfu"}`,
		`{"budget_bytes": 1048576, "policy": "LRU", "prefetch": false, "graph_misses": "copy"}`,
		`{"budget_bytes": 5, "graph_misses": " Auto ", "admit_margin": 0.5, "max_slots": 3}`,
		`{"budget_bytes": 5, "graph_misses": "dma"}`,
		`{"budget_bytes": 5, "backend": "cuda", "device": 1}`,
		`{"budget_bytes": 1, "policy": null}`,
		`{"budget_bytes": -1}`,
		`{"budget_bytes": 1, "admit_margin": -2}`,
		`{"budget_bytes": 1, "unknown": 1}`,
		`{"budget_bytes": 1, "link_rates": {"dma_gbps": 52, "zero_copy_gbps": 33, "reaction_us": 20}}`,
		`{"budget_bytes": 1, "link_rates": {"dma_gbps": 0, "zero_copy_gbps": 33}}`,
		`{"budget_bytes": 1, "measure_link": false}`, `{"budget_bytes": 1, "measure_link": null, "link_rates": null}`,
		`{"budget_bytes": 1, "cpu_experts": "auto"}`, `{"budget_bytes": 1, "cpu_experts": 4}`,
		`{"budget_bytes": 1, "cpu_experts": 0}`, `{"budget_bytes": 1, "cpu_experts": " off"}`,
		`{"budget_bytes": 1, "kernel_build": "sm89"}`, `{"budget_bytes": 1, "kernel_build": "sm80", "backend": "cuda"}`,
		`{"budget_bytes": 1, "kernel_build": "SM89"}`, `{"budget_bytes": 1, "kernel_build": ""}`, `{"budget_bytes": 1, "kernel_build": "sm90"}`,
		`{"budget_bytes": 1, "Policy": "lru"}`,
		`{"budget_bytes": 1, "policy": "lru", "policy": "lfu"}`,
		`{"budget_bytes": 1} {"budget_bytes": 2}`,
		fuzzPolicySpace,
		`[]`, `{`, ``, `null`,
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
		case c.LinkRates != nil && (c.LinkRates.DMAGBps <= 0 || c.LinkRates.ZeroCopyGBps <= 0 || c.LinkRates.ReactionUs < 0):
			t.Fatalf("accepted link_rates %+v", *c.LinkRates)
		case c.Prefetch == nil:
			t.Fatal("prefetch default not filled in")
		}
		given := givenNames(t, b)
		for _, nv := range c.names() {
			s, v := nv.setting, *nv.value
			if !slices.Contains(s.names, v) {
				t.Fatalf("accepted %s %q (input %q)", s.key, v, b)
			}
			if g, ok := given[s.key]; ok && g != v {
				t.Fatalf("%s %q given, %q accepted", s.key, g, v)
			} else if !ok && v != s.names[0] {
				t.Fatalf("%s left out is %q, not the default %q", s.key, v, s.names[0])
			}
		}
		checkOneObject(t, b, func(b []byte) error { _, err := ParseConfig(b); return err })
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

// checkOneObject checks that accepted b is one JSON object that parse
// rejects with anything appended.
func checkOneObject(t *testing.T, b []byte, parse func([]byte) error) {
	trimmed := bytes.TrimSpace(b)
	if len(trimmed) == 0 || trimmed[0] != '{' || trimmed[len(trimmed)-1] != '}' || !json.Valid(b) {
		t.Fatalf("accepted %q, which is not one JSON object", b)
	}
	for _, tail := range trailers {
		if err := parse(append(bytes.Clone(b), tail...)); !errors.Is(err, ErrInvalid) {
			t.Fatalf("accepted %q followed by %q (error %v)", b, tail, err)
		}
	}
}

// FuzzParseSetup: the setup JSON (module list and slot layout) arrives
// through the C ABI. ParseSetup never panics, errors wrap ErrInvalid, the
// input is one object with nothing after it, what it accepts is what
// encoding/json decodes (with the default ffn filled in), the ffn is one of
// FFNKinds, and an accepted setup round-trips.
func FuzzParseSetup(f *testing.F) {
	for _, s := range []string{
		`{"layers": ["model.layers.0.block_sparse_moe"], "budget_bytes": 10}`,
		`{"layout": {"regions": [{"name": "gate_up_proj", "parts": ["w1.weight", "w3.weight"], "dtype": "bfloat16"}], "alignment": 256}}`,
		`{"layout": {"regions": []}}`,
		`{"layout": {"regions": [{"Name": "r"}]}}`,
		`{"layers": ["a"], "layers": ["b"]}`,
		`{"layers": []} []`,
		`{"layers": 3}`, `null`, `{`,
		`{"ffn": "swiglu"}`, `{"ffn": " swiglu"}`, `{"ffn": "SwiGLU"}`, `{"ffn": ""}`, `{"ffn": "none"}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := ParseSetup(b)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("error %v does not wrap ErrInvalid", err)
			}
			return
		}
		checkOneObject(t, b, func(b []byte) error { _, err := ParseSetup(b); return err })
		var ref Setup
		require.NoError(t, json.Unmarshal(b, &ref))
		require.Contains(t, FFNKinds, s.FFN, "accepted ffn %q", s.FFN)
		if ref.FFN == "" {
			ref.FFN = FFNKinds[0] // left out: the default, filled in
		}
		require.True(t, reflect.DeepEqual(ref, s), "ParseSetup %+v, encoding/json %+v", s, ref)
		again, err := json.Marshal(s)
		require.NoError(t, err)
		s2, err := ParseSetup(again)
		require.NoError(t, err, "an accepted setup does not parse again: %s", again)
		again2, err := json.Marshal(s2)
		require.NoError(t, err)
		require.Equal(t, string(again), string(again2))
	})
}

// FuzzParseTuning: the tuning JSON arrives through the C ABI
// (moe_engine_tune). ParseTuning never panics, errors wrap ErrInvalid and
// the input is one object with nothing after it. Tune on a running engine
// either applies every name setting exactly as given or fails with
// ErrInvalid and changes none of them.
func FuzzParseTuning(f *testing.F) {
	for _, s := range []string{
		`{"policy": "lru", "prefetch": false, "graph_misses": "copy", "flush": true, "reset_stats": true}`,
		`{"policy": "priority"}`, `{"graph_misses": "auto"}`, `{}`,
		`{"policy": " "}`, `{"policy": ""}`, `{"policy": null}`, `{"policy": "LFU"}`,
		`{"policy": "lru", "graph_misses": "dma"}`, `{"cpu_experts": "off"}`, `{"cpu_experts": "auto"}`, `{"cpu_experts": null}`,
		`{"cpu_experts": 4}`, `{"policy": "lru", "cpu_experts": "auto"}`,
		`{"Policy": "lru"}`, `{"policy": "lru"} x`, `{"flush": 1}`, `null`, ``,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		tu, err := ParseTuning(b)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("error %v does not wrap ErrInvalid", err)
			}
			return
		}
		checkOneObject(t, b, func(b []byte) error { _, err := ParseTuning(b); return err })
		given := givenNames(t, b)
		for _, nv := range tu.names() {
			if g, ok := given[nv.setting.key]; ok != (nv.value != nil) || ok && g != *nv.value {
				t.Fatalf("%s: input gives %q (%v), parsed %v", nv.setting.key, g, ok, nv.value)
			}
		}
		e, _ := newEngine(t, Config{BudgetBytes: 4 * slotBytes, Policy: "lfu", GraphMisses: "read"}, 1, 2)
		before := e.Config()
		err = e.Tune(tu)
		after := e.Config()
		for _, nv := range tu.names() {
			was, now := configValue(&before, nv.setting), configValue(&after, nv.setting)
			switch {
			case err != nil && now != was:
				t.Fatalf("failed Tune (%v) changed %s from %q to %q", err, nv.setting.key, was, now)
			case err == nil && nv.value == nil && now != was:
				t.Fatalf("Tune changed %s, which it was not given, from %q to %q", nv.setting.key, was, now)
			case err == nil && nv.value != nil && now != *nv.value:
				t.Fatalf("Tune given %s %q left %q", nv.setting.key, *nv.value, now)
			}
		}
		if err != nil {
			require.ErrorIs(t, err, ErrInvalid)
			return
		}
		p, err := e.Plan()
		require.NoError(t, err)
		require.Equal(t, after.Policy, p.Policy)
		require.Contains(t, []string{"read", "copy"}, p.GraphMisses)
	})
}
