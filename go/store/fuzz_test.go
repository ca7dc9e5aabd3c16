package store

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// FuzzParseHeader feeds arbitrary files to ParseHeader (fileSize = len(data))
// and checks the invariants of every accepted header. The seed corpus lives
// in testdata/fuzz/FuzzParseHeader.
func FuzzParseHeader(f *testing.F) {
	f.Add(stBytes(`{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}`, 8))
	f.Fuzz(func(t *testing.T, data []byte) {
		h, err := ParseHeader(data, int64(len(data)))
		if err != nil {
			if h != nil {
				t.Fatalf("non-nil header with error %v", err)
			}
			if _, ok := err.(*FormatError); !ok {
				t.Fatalf("error %T is not a *FormatError: %v", err, err)
			}
			if !strings.HasPrefix(err.Error(), "store: ") {
				t.Fatalf("error without package prefix: %v", err)
			}
			return
		}
		size := int64(len(data))
		if h.DataStart < 8 || h.DataStart > size {
			t.Fatalf("DataStart %d outside file of %d bytes", h.DataStart, size)
		}
		if js := bytes.TrimRight(data[8:h.DataStart], " \t\r\n"); len(js) == 0 || js[len(js)-1] != '}' {
			t.Fatalf("accepted a header with data after its JSON object: %q", data[8:h.DataStart])
		}
		var prevEnd int64
		var prevName string
		seen := map[string]bool{}
		for i, ti := range h.Tensors {
			if ti.Name == metadataKey || seen[ti.Name] {
				t.Fatalf("bad or duplicate name %q", ti.Name)
			}
			seen[ti.Name] = true
			if !ti.DType.Valid() {
				t.Fatalf("tensor %q: invalid dtype", ti.Name)
			}
			if ti.Begin < 0 || ti.Begin > ti.End || h.DataStart+ti.End > size {
				t.Fatalf("tensor %q [%d, %d) outside file (data start %d, size %d)", ti.Name, ti.Begin, ti.End, h.DataStart, size)
			}
			n, ok := byteSize(ti.Shape, ti.DType)
			if !ok || n != ti.End-ti.Begin {
				t.Fatalf("tensor %q: %d bytes for shape %v of %s", ti.Name, ti.End-ti.Begin, ti.Shape, ti.DType)
			}
			if i > 0 && ti.Begin < h.Tensors[i-1].Begin {
				t.Fatalf("tensors not sorted by Begin")
			}
			if ti.Begin < ti.End {
				if ti.Begin < prevEnd {
					t.Fatalf("tensor %q [%d, %d) overlaps %q ending at %d", ti.Name, ti.Begin, ti.End, prevName, prevEnd)
				}
				prevEnd, prevName = ti.End, ti.Name
			}
			_ = data[h.DataStart+ti.Begin : h.DataStart+ti.End] // must not panic
		}
	})
}

// FuzzParseIndex feeds arbitrary bytes to ParseIndex and checks that every
// accepted shard name is a safe local path. The seed corpus lives in
// testdata/fuzz/FuzzParseIndex.
func FuzzParseIndex(f *testing.F) {
	f.Add([]byte(`{"metadata":{"total_size":8},"weight_map":{"a":"model-00001-of-00001.safetensors"}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		idx, err := ParseIndex(data)
		if err != nil {
			if idx != nil {
				t.Fatalf("non-nil index with error %v", err)
			}
			if _, ok := err.(*FormatError); !ok {
				t.Fatalf("error %T is not a *FormatError: %v", err, err)
			}
			return
		}
		if idx.WeightMap == nil {
			t.Fatal("nil WeightMap on success")
		}
		for _, tail := range []string{"x", "}", "{}", " 0", "\x00"} {
			if _, err := ParseIndex(append(bytes.Clone(data), tail...)); err == nil {
				t.Fatalf("accepted %q followed by %q", data, tail)
			}
		}
		for name, shard := range idx.WeightMap {
			if !filepath.IsLocal(shard) || filepath.Clean(shard) != shard || strings.Contains(shard, "..") ||
				!strings.HasSuffix(shard, ".safetensors") {
				t.Fatalf("tensor %q: unsafe shard name %q accepted", name, shard)
			}
			joined := filepath.Join("/root/model", shard)
			if !strings.HasPrefix(joined, "/root/model/") {
				t.Fatalf("shard %q escapes the index directory: %q", shard, joined)
			}
		}
		shards := idx.Shards()
		for i := 1; i < len(shards); i++ {
			if shards[i-1] >= shards[i] {
				t.Fatalf("Shards not sorted and unique: %q", shards)
			}
		}
	})
}

// TestFuzzSeedCorpus checks that the committed seeds named valid_* parse and
// all others are rejected, so the corpus keeps covering both outcomes.
func TestFuzzSeedCorpus(t *testing.T) {
	for _, target := range []string{"FuzzParseHeader", "FuzzParseIndex"} {
		files, err := filepath.Glob(filepath.Join("testdata", "fuzz", target, "*"))
		require.NoError(t, err)
		require.GreaterOrEqual(t, len(files), 8, target)
		for _, f := range files {
			b, err := os.ReadFile(f)
			require.NoError(t, err)
			lines := strings.SplitN(strings.TrimSpace(string(b)), "\n", 2)
			require.Len(t, lines, 2, f)
			require.Equal(t, "go test fuzz v1", lines[0], f)
			lit := strings.TrimSuffix(strings.TrimPrefix(lines[1], "[]byte("), ")")
			s, err := strconv.Unquote(lit)
			require.NoError(t, err, f)
			data := []byte(s)
			if target == "FuzzParseHeader" {
				_, err = ParseHeader(data, int64(len(data)))
			} else {
				_, err = ParseIndex(data)
			}
			if strings.HasPrefix(filepath.Base(f), "valid_") {
				assert.NoError(t, err, f)
			} else {
				assert.Error(t, err, f)
			}
		}
	}
}
