package strictjson

import (
	"bytes"
	"encoding/json"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

type inner struct {
	Name string `json:"name"`
}

type base struct {
	Shared int `json:"shared"`
}

type sample struct {
	base
	Count  int               `json:"count"`
	Ptr    *float64          `json:"ptr,omitempty"`
	Items  []inner           `json:"items"`
	Nested *inner            `json:"nested"`
	Free   map[string]inner  `json:"free"`
	Raw    json.RawMessage   `json:"raw"`
	Plain  string            // no tag: the field name
	Skip   string            `json:"-"`
	Any    map[string]any    `json:"any"`
	Grid   [][]inner         `json:"grid"`
	Arr    [2]inner          `json:"arr"`
	Labels map[string]string `json:"labels"`
}

func TestDecodeAccepts(t *testing.T) {
	var s sample
	require.NoError(t, Decode([]byte(" \n{\"count\": 3, \"shared\": 1, \"items\": [{\"name\": \"a\"}], \"nested\": {\"name\": \"b\"},"+
		"\"free\": {\"K\": {\"name\": \"c\"}}, \"raw\": {\"x\": 1, \"X\": 2}, \"Plain\": \"p\", \"grid\": [[{\"name\": \"g\"}]],"+
		"\"arr\": [{\"name\": \"0\"}, {\"name\": \"1\"}]}\r\n\t"), &s))
	assert.Equal(t, 3, s.Count)
	assert.Equal(t, 1, s.Shared)
	assert.Equal(t, "a", s.Items[0].Name)
	assert.Equal(t, "b", s.Nested.Name)
	assert.Equal(t, "c", s.Free["K"].Name, "map keys are free")
	assert.Equal(t, "p", s.Plain)
	assert.Equal(t, "g", s.Grid[0][0].Name)
	assert.Equal(t, "1", s.Arr[1].Name)
}

func TestDecodeRejects(t *testing.T) {
	for _, tc := range []struct{ name, in, msg string }{
		{"empty", ``, "expected a JSON object, found nothing"},
		{"spaces", "  \n", "expected a JSON object, found nothing"},
		{"null", `null`, `expected a JSON object, found "null"`},
		{"array", `[]`, "expected a JSON object"},
		{"string", `"x"`, "expected a JSON object"},
		{"truncated", `{"count": 1`, "unexpected end of JSON input"},
		{"unknown key", `{"bogus": 1}`, `unknown key "bogus" (valid keys: Plain, any, arr, count, free, grid, items, labels, nested, ptr, raw, shared)`},
		{"unknown nested key", `{"nested": {"nom": "x"}}`, `unknown key "nom" in nested (valid keys: name)`},
		{"skipped field", `{"Skip": "x"}`, `unknown key "Skip" (valid keys: Plain,`},
		{"wrong type", `{"count": "1"}`, "cannot unmarshal string"},
		{"trailing object", `{"count": 1} {"count": 2}`, `unexpected data after the JSON object at byte 12: "{\"count\": 2}"`},
		{"trailing garbage", `{"count": 1}x`, `unexpected data after the JSON object at byte 12: "x"`},
		{"trailing brace", `{"count": 1}}`, "unexpected data after the JSON object"},
		{"trailing NUL", "{\"count\": 1}\x00", "unexpected data after the JSON object"},
		{"trailing comment", "{\"count\": 1} // x", "unexpected data after the JSON object"},
		{"key case", `{"Count": 1}`, `key "Count" must be spelled "count" (keys are case-sensitive)`},
		{"untagged key case", `{"plain": "p"}`, `key "plain" must be spelled "Plain"`},
		{"promoted key case", `{"SHARED": 1}`, `key "SHARED" must be spelled "shared"`},
		{"nested key case", `{"items": [{"name": "a"}, {"Name": "b"}]}`, `key "Name" in items[1] must be spelled "name"`},
		{"map value key case", `{"free": {"k": {"NAME": "x"}}}`, `key "NAME" in free.k must be spelled "name"`},
		{"grid key case", `{"grid": [[{"nAme": "x"}]]}`, `key "nAme" in grid[0][0] must be spelled "name"`},
		{"duplicate", `{"count": 1, "count": 2}`, `duplicate key "count"`},
		{"duplicate differing in case", `{"count": 1, "Count": 2}`, `key "Count" must be spelled "count"`},
		{"duplicate nested", `{"nested": {"name": "a", "name": "b"}}`, `duplicate key "name" in nested`},
		{"duplicate in map", `{"labels": {"a": "1", "a": "2"}}`, `duplicate key "a" in labels`},
		{"duplicate in free JSON", `{"any": {"x": {"y": 1, "y": 2}}}`, `duplicate key "y" in any.x`},
		{"duplicate in raw", `{"raw": {"y": 1, "y": 2}}`, `duplicate key "y" in raw`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var s sample
			err := Decode([]byte(tc.in), &s)
			require.Error(t, err)
			assert.Contains(t, err.Error(), tc.msg)
		})
	}
}

func TestDecodeNeedsPointerToStruct(t *testing.T) {
	var m map[string]any
	assert.ErrorContains(t, Decode([]byte(`{}`), &m), "pointer to a struct")
	assert.ErrorContains(t, Decode([]byte(`{}`), sample{}), "pointer to a struct")
	assert.ErrorContains(t, Decode([]byte(`{}`), nil), "pointer to a struct")
}

// FuzzDecode: whatever Decode accepts, encoding/json accepts too and
// decodes to the same value; the input is one object and nothing after
// it, so appending a byte that is not whitespace makes it an error; and
// the value round-trips.
func FuzzDecode(f *testing.F) {
	for _, s := range []string{
		`{"count": 1, "items": [{"name": "a"}], "free": {"k": {"name": "v"}}}`,
		`{"nested": {"name": "b"}, "ptr": 1.5, "raw": [1, {"a": 2}], "Plain": "x"}`,
		`{"count": 1} {}`, `{"Count": 1}`, `{"count": 1, "count": 1}`, `null`, ` {} `,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var s sample
		if err := Decode(b, &s); err != nil {
			return
		}
		var ref sample
		require.NoError(t, json.Unmarshal(b, &ref), "encoding/json rejects what Decode accepted")
		want, err := json.Marshal(ref)
		require.NoError(t, err)
		got, err := json.Marshal(s)
		require.NoError(t, err)
		require.Equal(t, string(want), string(got))
		trimmed := bytes.TrimSpace(b)
		require.True(t, len(trimmed) > 0 && trimmed[0] == '{' && trimmed[len(trimmed)-1] == '}', "accepted %q", b)
		for _, tail := range []string{"x", "}", "{}", "0", "\x00"} {
			require.Error(t, Decode(append(bytes.Clone(b), tail...), &sample{}), "accepted %q followed by %q", b, tail)
		}
		var again sample
		require.NoError(t, Decode(got, &again), "a value does not decode from its own encoding: %s", got)
		regot, err := json.Marshal(again)
		require.NoError(t, err)
		require.Equal(t, string(got), string(regot))
	})
}
