package engine

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// settingCase is a value of a name setting and, when it is accepted, what
// it becomes.
type settingCase struct {
	name string // subtest name
	json string // the value as it appears in the JSON ("" = left out)
	want string // accepted value; "" = rejected
}

// settingCases are the values every name setting is checked with: its
// names, left out, and the near misses the one rule rejects.
func settingCases(s nameSetting) []settingCase {
	name := s.names[len(s.names)-1] // a name that is not the default
	cases := []settingCase{{"left out", "", s.names[0]}}
	for _, n := range s.names {
		cases = append(cases, settingCase{n, js(n), n})
	}
	return append(cases,
		settingCase{"empty", `""`, ""},
		settingCase{"space", `" "`, ""},
		settingCase{"tab", `"\t"`, ""},
		settingCase{"null", `null`, ""},
		settingCase{"upper", js(strings.ToUpper(name)), ""},
		settingCase{"title", js(strings.ToUpper(name[:1]) + name[1:]), ""},
		settingCase{"leading space", js(" " + name), ""},
		settingCase{"trailing space", js(name + " "), ""},
		settingCase{"trailing newline", js(name + "\n"), ""},
		settingCase{"trailing NUL", js(name + "\x00"), ""},
		settingCase{"nbsp", js(name + "\u00a0"), ""},
		settingCase{"unknown", `"fifo-dma"`, ""},
		settingCase{"number", `1`, ""},
		settingCase{"list", "[" + js(name) + "]", ""},
	)
}

// js is s as a JSON string.
func js(s string) string {
	b, err := json.Marshal(s)
	if err != nil {
		panic(err)
	}
	return string(b)
}

var nameSettings = []nameSetting{policySetting, graphMissesSetting, backendSetting, kernelBuildSetting}

// configValue is the value of setting s in c.
func configValue(c *Config, s nameSetting) string {
	for _, nv := range c.names() {
		if nv.setting.key == s.key {
			return *nv.value
		}
	}
	panic("no setting " + s.key)
}

func TestConfigNameSettings(t *testing.T) {
	require.Len(t, (&Config{}).names(), len(nameSettings), "every name setting of Config is tested")
	for _, s := range nameSettings {
		for _, tc := range settingCases(s) {
			t.Run(s.key+"/"+tc.name, func(t *testing.T) {
				in := `{"budget_bytes": 1}`
				if tc.json != "" {
					in = fmt.Sprintf(`{"budget_bytes": 1, %q: %s}`, s.key, tc.json)
				}
				c, err := ParseConfig([]byte(in))
				if tc.want != "" {
					require.NoError(t, err, in)
					assert.Equal(t, tc.want, configValue(&c, s))
					return
				}
				require.ErrorIs(t, err, ErrInvalid, in)
				assert.Contains(t, err.Error(), s.key, "the error names the setting")
				if !strings.Contains(err.Error(), "cannot unmarshal") { // a string or null: the rule's own message
					assert.Contains(t, err.Error(), "(supported: "+strings.Join(s.names, ", "), "the error lists the names")
				}
			})
		}
	}
}

// A Config built in Go follows the same rule; "" there is a setting left
// out.
func TestConfigNameSettingsFromGo(t *testing.T) {
	for _, s := range nameSettings {
		for _, v := range []string{" ", "\t", strings.ToUpper(s.names[1]), " " + s.names[1], s.names[1] + "\n"} {
			c := Config{BudgetBytes: 1}
			nv := c.names()
			for _, x := range nv {
				if x.setting.key == s.key {
					*x.value = v
				}
			}
			_, err := c.withDefaults()
			require.ErrorIs(t, err, ErrInvalid, "%s=%q", s.key, v)
			assert.ErrorContains(t, err, s.key+": unknown "+s.what+" "+fmt.Sprintf("%q", v))
		}
		c, err := Config{BudgetBytes: 1}.withDefaults()
		require.NoError(t, err)
		assert.Equal(t, s.names[0], configValue(&c, s), "%s: left out is the default", s.key)
	}
}

func TestNameSettingHint(t *testing.T) {
	for v, hint := range map[string]bool{"LRU": true, " lru": true, "lru\n": true, "Lfu ": true, "fifo": false, "": false, " ": false} {
		_, err := policySetting.parse(v, true)
		require.Error(t, err, v)
		assert.Equal(t, hint, strings.Contains(err.Error(), "names are exact: lowercase, without spaces"), "%q: %v", v, err)
	}
	_, err := ParseConfig([]byte(`{"budget_bytes": 1, "policy": "LRU"}`))
	assert.EqualError(t, err, `invalid argument: policy: unknown cache policy "LRU" (supported: priority, lru, lfu; names are exact: lowercase, without spaces)`)
	_, err = ParseConfig([]byte(`{"budget_bytes": 1, "policy": null}`))
	assert.EqualError(t, err, `invalid argument: policy: unknown cache policy null (supported: priority, lru, lfu)`)
}

// fuzzPolicySpace is the input FuzzParseConfig found: a policy of one
// space was accepted as "" (testdata/fuzz/FuzzParseConfig/policy_space*).
const fuzzPolicySpace = `{"budget_bytes": 1048576, "policy":" "}`

func TestParseConfigStrictDocument(t *testing.T) {
	valid := `{"budget_bytes": 1, "policy": "lru"}`
	_, err := ParseConfig([]byte(" \n" + valid + "\n\t "))
	require.NoError(t, err, "whitespace around the object is fine")
	for _, tc := range []struct{ name, in, msg string }{
		{"fuzz finding", fuzzPolicySpace, `policy: unknown cache policy " "`},
		{"fuzz finding with trailing bytes", fuzzPolicySpace + "0\x00}", "unexpected data after the JSON object"},
		{"trailing garbage", valid + "x", "unexpected data after the JSON object"},
		{"trailing brace", valid + "}", "unexpected data after the JSON object"},
		{"second object", valid + ` {"budget_bytes": 2}`, "unexpected data after the JSON object"},
		{"trailing NUL", valid + "\x00", "unexpected data after the JSON object"},
		{"trailing number", valid + " 1", "unexpected data after the JSON object"},
		{"key case", `{"budget_bytes": 1, "Policy": "lru"}`, `key "Policy" must be spelled "policy"`},
		{"key case budget", `{"Budget_Bytes": 1}`, `key "Budget_Bytes" must be spelled "budget_bytes"`},
		{"duplicate key", `{"budget_bytes": 1, "policy": "lru", "policy": "lfu"}`, `duplicate key "policy"`},
		{"duplicate key differing in case", `{"budget_bytes": 1, "policy": "lru", "POLICY": "lfu"}`, `must be spelled "policy"`},
		{"null document", `null`, "expected a JSON object"},
		{"array document", `[{"budget_bytes": 1}]`, "expected a JSON object"},
		{"empty", ``, "expected a JSON object"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseConfig([]byte(tc.in))
			require.ErrorIs(t, err, ErrInvalid, "%q", tc.in)
			assert.Contains(t, err.Error(), tc.msg)
		})
	}
}

func TestParseSetupStrictDocument(t *testing.T) {
	valid := `{"layers": ["a"], "layout": {"regions": [{"name": "r", "parts": ["p"]}]}}`
	s, err := ParseSetup([]byte(valid + "\n"))
	require.NoError(t, err)
	assert.Equal(t, []string{"a"}, s.Layers)
	for _, tc := range []struct{ name, in, msg string }{
		{"trailing garbage", valid + "x", "unexpected data after the JSON object"},
		{"second object", valid + "{}", "unexpected data after the JSON object"},
		{"key case", `{"Layers": ["a"]}`, `key "Layers" must be spelled "layers"`},
		{"nested key case", `{"layout": {"regions": [{"Name": "r"}]}}`, `key "Name" in layout.regions[0] must be spelled "name"`},
		{"duplicate key", `{"layers": ["a"], "layers": ["b"]}`, `duplicate key "layers"`},
		{"null document", `null`, "expected a JSON object"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseSetup([]byte(tc.in))
			require.ErrorIs(t, err, ErrInvalid)
			assert.Contains(t, err.Error(), tc.msg)
		})
	}
}

func TestTuningNameSettings(t *testing.T) {
	require.Len(t, (&Tuning{}).names(), 2, "every name setting of Tuning is tested")
	for _, s := range []nameSetting{policySetting, graphMissesSetting} {
		for _, tc := range settingCases(s) {
			if tc.json == "" {
				continue // left out: no change, TestTuneLeavesOutUnchanged
			}
			t.Run(s.key+"/"+tc.name, func(t *testing.T) {
				in := fmt.Sprintf(`{%q: %s}`, s.key, tc.json)
				tu, err := ParseTuning([]byte(in))
				if err == nil { // a string: Tune checks the name
					e, _ := newEngine(t, Config{BudgetBytes: 4 * slotBytes}, 1, 2)
					err = e.Tune(tu)
					if tc.want != "" {
						require.NoError(t, err, in)
						c := e.Config()
						assert.Equal(t, tc.want, configValue(&c, s))
						return
					}
				}
				require.Equal(t, "", tc.want, "%s rejected: %v", in, err)
				require.ErrorIs(t, err, ErrInvalid, in)
				assert.Contains(t, err.Error(), s.key)
			})
		}
	}
}

// A rejected Tuning changes nothing, not even the settings before the bad
// one.
func TestTuneRejectsBeforeChanging(t *testing.T) {
	e, _ := newEngine(t, Config{BudgetBytes: 4 * slotBytes}, 1, 2)
	lru, bad := "lru", "Copy"
	err := e.Tune(Tuning{Policy: &lru, GraphMisses: &bad})
	require.ErrorIs(t, err, ErrInvalid)
	assert.ErrorContains(t, err, `graph_misses: unknown graph-miss mode "Copy"`)
	assert.Equal(t, "priority", e.Config().Policy)
	p, err := e.Plan()
	require.NoError(t, err)
	assert.Equal(t, "priority", p.Policy)
}

func TestTuneLeavesOutUnchanged(t *testing.T) {
	e, _ := newEngine(t, Config{BudgetBytes: 4 * slotBytes, Policy: "lfu", GraphMisses: "copy"}, 1, 2)
	tu, err := ParseTuning([]byte(`{"reset_stats": true}`))
	require.NoError(t, err)
	require.NoError(t, e.Tune(tu))
	assert.Equal(t, "lfu", e.Config().Policy)
	assert.Equal(t, "copy", e.Config().GraphMisses)
}

func TestParseTuningStrictDocument(t *testing.T) {
	for _, tc := range []struct{ name, in, msg string }{
		{"trailing garbage", `{"policy": "lru"}x`, "unexpected data after the JSON object"},
		{"second object", `{"policy": "lru"} {"policy": "lfu"}`, "unexpected data after the JSON object"},
		{"unknown key", `{"polcy": "lru"}`, `unknown key "polcy" (valid keys: cpu_experts, flush, graph_misses, kernel_max_tokens, policy, prefetch, reset_stats)`},
		{"key case", `{"Flush": true}`, `key "Flush" must be spelled "flush"`},
		{"duplicate key", `{"policy": "lru", "policy": "lfu"}`, `duplicate key "policy"`},
		{"null document", `null`, "expected a JSON object"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseTuning([]byte(tc.in))
			require.ErrorIs(t, err, ErrInvalid)
			assert.Contains(t, err.Error(), tc.msg)
		})
	}
}
