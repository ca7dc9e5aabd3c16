package store

import (
	"encoding/json"
	"path/filepath"
	"sort"
	"strings"
	"unicode/utf8"
)

// IndexFileName is the conventional name of a sharded checkpoint's index.
const IndexFileName = "model.safetensors.index.json"

// SingleFileName is the conventional name of an unsharded checkpoint.
const SingleFileName = "model.safetensors"

// Index is a parsed model.safetensors.index.json.
type Index struct {
	// Metadata is the optional "metadata" object (e.g. "total_size"); nil
	// when absent or null.
	Metadata map[string]any
	// WeightMap maps each tensor name to the shard file (relative to the
	// index's directory) that holds it.
	WeightMap map[string]string
}

// ParseIndex parses and validates a safetensors index. The top level must be
// a JSON object without duplicate keys; "weight_map" must exist and be an
// object mapping tensor names to strings (no duplicate names); "metadata", if
// present and not null, must be an object. Every shard file name must be
// non-empty, relative, clean (filepath.Clean leaves it unchanged), free of
// ".." and NUL, and end in ".safetensors". Errors are *FormatError values.
func ParseIndex(b []byte) (*Index, error) {
	if !utf8.Valid(b) {
		return nil, formatErr("", "index is not valid UTF-8")
	}
	members, err := readObject(b)
	if err != nil {
		return nil, formatErr("", "index JSON: %v", err)
	}
	idx := &Index{}
	found := false
	for _, m := range members {
		switch m.key {
		case "metadata":
			if isNull(m.val) {
				continue
			}
			if _, err := readObject(m.val); err != nil {
				return nil, formatErr("", "index metadata must be an object: %v", err)
			}
			if err := json.Unmarshal(m.val, &idx.Metadata); err != nil {
				return nil, formatErr("", "index metadata: %v", err) // e.g. a number out of float64 range
			}
		case "weight_map":
			found = true
			entries, err := readObject(m.val)
			if err != nil {
				return nil, formatErr("", "weight_map must be an object of tensor name -> shard file: %v", err)
			}
			idx.WeightMap = make(map[string]string, len(entries))
			for _, e := range entries {
				shard, err := decodeString(e.val)
				if err != nil {
					return nil, formatErr(e.key, "weight_map value: %v", err)
				}
				if problem := checkShardName(shard); problem != "" {
					return nil, formatErr(e.key, "weight_map shard %q %s", shard, problem)
				}
				idx.WeightMap[e.key] = shard
			}
		}
	}
	if !found {
		return nil, formatErr("", `index has no "weight_map"`)
	}
	return idx, nil
}

// checkShardName returns "" if s is an acceptable shard file name, else a
// description of the problem.
func checkShardName(s string) string {
	switch {
	case s == "":
		return "is empty"
	case strings.IndexByte(s, 0) >= 0:
		return "contains a NUL byte"
	case filepath.IsAbs(s):
		return "is an absolute path; shard names must be relative to the index"
	case strings.Contains(s, ".."):
		return `contains ".."`
	case filepath.Clean(s) != s:
		return "is not a clean relative path"
	case !strings.HasSuffix(s, ".safetensors"):
		return `does not end in ".safetensors"`
	case !filepath.IsLocal(s):
		return "is not a local path" // unreachable given the checks above
	}
	return ""
}

// Shards returns the distinct shard file names in WeightMap, sorted.
func (x *Index) Shards() []string {
	set := make(map[string]struct{})
	for _, s := range x.WeightMap {
		set[s] = struct{}{}
	}
	out := make([]string, 0, len(set))
	for s := range set {
		out = append(out, s)
	}
	sort.Strings(out)
	return out
}

// TensorsIn returns the tensor names WeightMap places in shard, sorted.
func (x *Index) TensorsIn(shard string) []string {
	var out []string
	for name, s := range x.WeightMap {
		if s == shard {
			out = append(out, name)
		}
	}
	sort.Strings(out)
	return out
}
