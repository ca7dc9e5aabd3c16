package store

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/dtype"
)

// manifest mirrors testdata/manifest.json, written by testdata/gen.py.
type manifest map[string]struct {
	Files   []string
	Tensors map[string]struct {
		File   string
		DType  string
		Shape  []int64
		NBytes int64
		SHA256 string
	}
	Modules []struct {
		Prefix     string
		NumExperts int `json:"num_experts"`
		Roles      []string
		Fused      bool
		Parts      []struct {
			Expert int
			Role   string
			Tensor string
			DType  string
			Shape  []int64
			NBytes int64
			SHA256 string
		}
	}
}

func loadManifest(t *testing.T) manifest {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", "manifest.json"))
	require.NoError(t, err, "regenerate with: python3 go/store/testdata/gen.py")
	var m manifest
	require.NoError(t, json.Unmarshal(b, &m))
	require.Len(t, m, 4)
	return m
}

func sha(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func TestOpenAgainstManifest(t *testing.T) {
	man := loadManifest(t)
	tests := []struct {
		name  string
		path  string // relative to testdata
		files []string
	}{
		{"mixtral", "mixtral", []string{"model.safetensors"}},
		{"mixtral", "mixtral/model.safetensors", []string{"model.safetensors"}},
		{"qwen", "qwen", []string{"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}},
		{"qwen", "qwen/model.safetensors.index.json", []string{"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}},
		{"fused", "fused", []string{"model.safetensors"}},
		{"switch", "switch", []string{"nllb.safetensors", "switch.safetensors"}}, // no index or model.safetensors: sorted glob
	}
	for _, tc := range tests {
		t.Run(tc.path, func(t *testing.T) {
			want := man[tc.name]
			c, err := Open(filepath.Join("testdata", tc.path))
			require.NoError(t, err)
			defer func() { require.NoError(t, c.Close()) }()

			var files []string
			for _, f := range c.Files() {
				files = append(files, filepath.Base(f))
			}
			assert.Equal(t, tc.files, files)

			// Tensors: names, dtypes, shapes, bytes, source file.
			var wantNames []string
			for n := range want.Tensors {
				wantNames = append(wantNames, n)
			}
			sort.Strings(wantNames)
			require.Equal(t, wantNames, c.Names())
			for n, wt := range want.Tensors {
				tn, ok := c.Tensor(n)
				require.True(t, ok, n)
				assert.Equal(t, n, tn.Name)
				assert.Equal(t, wt.DType, tn.DType.String(), n)
				assert.Equal(t, wt.Shape, tn.Shape, n)
				assert.Equal(t, wt.NBytes, tn.NumBytes(), n)
				assert.Equal(t, wt.SHA256, sha(tn.Bytes()), n)
				assert.Equal(t, wt.File, filepath.Base(tn.Source), n)
			}

			// Experts: modules in natural order, roles, every part's bytes.
			x, err := c.Experts()
			require.NoError(t, err)
			require.Len(t, x.Modules, len(want.Modules))
			for i, wm := range want.Modules {
				m := x.Modules[i]
				assert.Equal(t, wm.Prefix, m.Prefix)
				assert.Equal(t, wm.NumExperts, m.NumExperts, wm.Prefix)
				assert.Equal(t, wm.Roles, m.Roles, wm.Prefix)
				assert.Equal(t, wm.Fused, m.Fused, wm.Prefix)
				got, ok := x.Module(wm.Prefix)
				require.True(t, ok)
				assert.Same(t, m, got)
				require.Len(t, wm.Parts, m.NumExperts*len(m.Roles))
				for _, wp := range wm.Parts {
					p, err := m.Part(wp.Expert, wp.Role)
					require.NoError(t, err)
					assert.Equal(t, wp.Tensor, p.Tensor)
					assert.Equal(t, wp.DType, p.DType.String())
					assert.Equal(t, wp.Shape, p.Shape)
					assert.Equal(t, wp.NBytes, p.NumBytes())
					assert.Equal(t, wp.SHA256, sha(p.Data), "%s expert %d role %s", wm.Prefix, wp.Expert, wp.Role)
					assert.Equal(t, want.Tensors[wp.Tensor].File, filepath.Base(p.Source))
				}
			}
			_, ok := x.Module("model.layers.1.mlp.shared_experts")
			assert.False(t, ok)
		})
	}
}

func TestMetadataFromPython(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("testdata", "mixtral", "model.safetensors"))
	require.NoError(t, err)
	h, err := ParseHeader(b, int64(len(b)))
	require.NoError(t, err)
	assert.Equal(t, map[string]string{"format": "pt", "model": "tiny-mixtral"}, h.Metadata)
	assert.Zero(t, h.DataStart%8, "safetensors pads the header to 8 bytes")
}

// copyFile copies testdata/src to dst.
func copyFile(t *testing.T, src, dst string) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", src))
	require.NoError(t, err)
	require.NoError(t, os.MkdirAll(filepath.Dir(dst), 0o755))
	require.NoError(t, os.WriteFile(dst, b, 0o644))
}

func writeFile(t *testing.T, path string, b []byte) string {
	t.Helper()
	require.NoError(t, os.MkdirAll(filepath.Dir(path), 0o755))
	require.NoError(t, os.WriteFile(path, b, 0o644))
	return path
}

func TestOpenErrors(t *testing.T) {
	mixtral, err := os.ReadFile(filepath.Join("testdata", "mixtral", "model.safetensors"))
	require.NoError(t, err)
	qwenIndex, err := os.ReadFile(filepath.Join("testdata", "qwen", "model.safetensors.index.json"))
	require.NoError(t, err)
	const shard1, shard2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"

	tests := []struct {
		name  string
		setup func(t *testing.T, dir string) string // returns the path to open
		want  []string
		is    error
	}{
		{
			name:  "missing path",
			setup: func(t *testing.T, dir string) string { return filepath.Join(dir, "no-such-model") },
			want:  []string{"no-such-model", "no such file or directory"},
			is:    fs.ErrNotExist,
		},
		{
			name: "text file",
			setup: func(t *testing.T, dir string) string {
				return writeFile(t, filepath.Join(dir, "README.md"), []byte("# Model card\nThis is not a safetensors file.\n"))
			},
			want: []string{"README.md", "exceeds the limit", "not a safetensors file?"},
		},
		{
			name: "tiny text file",
			setup: func(t *testing.T, dir string) string {
				return writeFile(t, filepath.Join(dir, "x.safetensors"), []byte("hi\n"))
			},
			want: []string{"x.safetensors", "file is 3 bytes, too small"},
		},
		{
			name:  "empty file",
			setup: func(t *testing.T, dir string) string { return writeFile(t, filepath.Join(dir, "e.safetensors"), nil) },
			want:  []string{"e.safetensors", "file is 0 bytes"},
		},
		{
			name: "truncated in data",
			setup: func(t *testing.T, dir string) string {
				return writeFile(t, filepath.Join(dir, "model.safetensors"), mixtral[:len(mixtral)-100])
			},
			want: []string{"model.safetensors", "run past the end of the data section", "truncated?"},
		},
		{
			name: "truncated in header",
			setup: func(t *testing.T, dir string) string {
				return writeFile(t, filepath.Join(dir, "model.safetensors"), mixtral[:200])
			},
			want: []string{"model.safetensors", "runs past the end of the 200-byte file"},
		},
		{
			name: "malformed header JSON",
			setup: func(t *testing.T, dir string) string {
				return writeFile(t, filepath.Join(dir, "m.safetensors"), stBytes(`{"a":{"dtype":"F32",`, 0))
			},
			want: []string{"m.safetensors", "header JSON"},
		},
		{
			name: "offsets past the end",
			setup: func(t *testing.T, dir string) string {
				return writeFile(t, filepath.Join(dir, "m.safetensors"), stBytes(`{"w":{"dtype":"F32","shape":[4,4],"data_offsets":[0,64]}}`, 60))
			},
			want: []string{"m.safetensors", `tensor "w"`, "data_offsets [0, 64] run past the end"},
		},
		{
			name: "header lying about its size",
			setup: func(t *testing.T, dir string) string {
				b := stBytes(`{"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}`, 4)
				b[0] += 3 // claims 3 more header bytes: swallows data into the JSON
				return writeFile(t, filepath.Join(dir, "m.safetensors"), b)
			},
			want: []string{"m.safetensors", "header JSON"},
		},
		{
			name: "header size larger than file",
			setup: func(t *testing.T, dir string) string {
				b := stBytes(`{}`, 0)
				b[0] = 200
				return writeFile(t, filepath.Join(dir, "m.safetensors"), b)
			},
			want: []string{"m.safetensors", "header length 200 bytes runs past the end of the 10-byte file"},
		},
		{
			name: "offsets lying about size",
			setup: func(t *testing.T, dir string) string {
				return writeFile(t, filepath.Join(dir, "m.safetensors"), stBytes(`{"w":{"dtype":"BF16","shape":[4],"data_offsets":[0,4]}}`, 8))
			},
			want: []string{"m.safetensors", `tensor "w"`, "span 4 bytes but shape [4] of BF16 needs 8"},
		},
		{
			name: "overlapping tensors",
			setup: func(t *testing.T, dir string) string {
				return writeFile(t, filepath.Join(dir, "m.safetensors"), stBytes(
					`{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F16","shape":[4],"data_offsets":[8,16]}}`, 16))
			},
			want: []string{"m.safetensors", `tensor "b"`, `overlap tensor "a"`},
		},
		{
			name: "unknown dtype",
			setup: func(t *testing.T, dir string) string {
				return writeFile(t, filepath.Join(dir, "m.safetensors"), stBytes(`{"a":{"dtype":"F4","shape":[4],"data_offsets":[0,2]}}`, 2))
			},
			want: []string{"m.safetensors", `tensor "a"`, `unknown dtype "F4"`},
		},
		{
			name: "directory without safetensors",
			setup: func(t *testing.T, dir string) string {
				writeFile(t, filepath.Join(dir, "config.json"), []byte("{}"))
				require.NoError(t, os.Mkdir(filepath.Join(dir, "sub.safetensors"), 0o755))
				return dir
			},
			want: []string{"no model.safetensors.index.json, model.safetensors or *.safetensors files"},
			is:   ErrNotFound,
		},
		{
			name: "directory with a bad shard among good ones",
			setup: func(t *testing.T, dir string) string {
				copyFile(t, "mixtral/model.safetensors", filepath.Join(dir, "a.safetensors"))
				writeFile(t, filepath.Join(dir, "b.safetensors"), []byte("garbage!garbage!"))
				return dir
			},
			want: []string{"b.safetensors", "exceeds the limit"},
		},
		{
			name: "index naming a missing shard",
			setup: func(t *testing.T, dir string) string {
				copyFile(t, "qwen/model.safetensors.index.json", filepath.Join(dir, IndexFileName))
				copyFile(t, "qwen/"+shard1, filepath.Join(dir, shard1))
				return dir
			},
			want: []string{IndexFileName, `shard "` + shard2 + `"`, `tensor "model.layers.1.mlp.experts.2.down_proj.weight"`, "no such file or directory"},
			is:   fs.ErrNotExist,
		},
		{
			name: "index shard is a directory",
			setup: func(t *testing.T, dir string) string {
				copyFile(t, "qwen/model.safetensors.index.json", filepath.Join(dir, IndexFileName))
				copyFile(t, "qwen/"+shard1, filepath.Join(dir, shard1))
				require.NoError(t, os.Mkdir(filepath.Join(dir, shard2), 0o755))
				return dir
			},
			want: []string{`shard "` + shard2 + `"`, "is a directory"},
		},
		{
			name: "index with absolute shard path",
			setup: func(t *testing.T, dir string) string {
				return writeFile(t, filepath.Join(dir, "idx.json"), []byte(`{"weight_map":{"w":"/etc/model.safetensors"}}`))
			},
			want: []string{"idx.json", `tensor "w"`, `"/etc/model.safetensors" is an absolute path`},
		},
		{
			name: "index with .. shard path",
			setup: func(t *testing.T, dir string) string {
				return writeFile(t, filepath.Join(dir, "sub", IndexFileName), []byte(`{"weight_map":{"w":"../model.safetensors"}}`))
			},
			want: []string{IndexFileName, `"../model.safetensors" contains ".."`},
		},
		{
			name: "index with empty weight_map",
			setup: func(t *testing.T, dir string) string {
				return writeFile(t, filepath.Join(dir, "idx.json"), []byte(`{"metadata":{},"weight_map":{}}`))
			},
			want: []string{"idx.json", "weight_map is empty"},
			is:   ErrNotFound,
		},
		{
			name: "index placing a tensor in the wrong shard",
			setup: func(t *testing.T, dir string) string {
				copyFile(t, "qwen/"+shard1, filepath.Join(dir, shard1))
				copyFile(t, "qwen/"+shard2, filepath.Join(dir, shard2))
				idx := strings.Replace(string(qwenIndex),
					`"model.embed_tokens.weight": "`+shard1, `"model.embed_tokens.weight": "`+shard2, 1)
				require.NotEqual(t, string(qwenIndex), idx)
				return writeFile(t, filepath.Join(dir, IndexFileName), []byte(idx))
			},
			want: []string{shard1, `tensor "model.embed_tokens.weight"`, `places it in shard "` + shard2 + `"`},
		},
		{
			name: "index naming a tensor no shard has",
			setup: func(t *testing.T, dir string) string {
				copyFile(t, "qwen/"+shard1, filepath.Join(dir, shard1))
				copyFile(t, "qwen/"+shard2, filepath.Join(dir, shard2))
				idx := strings.Replace(string(qwenIndex), `"weight_map": {`, `"weight_map": {"ghost.weight": "`+shard2+`",`, 1)
				return writeFile(t, filepath.Join(dir, IndexFileName), []byte(idx))
			},
			want: []string{IndexFileName, `tensor "ghost.weight"`, "does not contain it"},
			is:   ErrNotFound,
		},
		{
			name: "index that is not JSON",
			setup: func(t *testing.T, dir string) string {
				return writeFile(t, filepath.Join(dir, IndexFileName), []byte("weights"))
			},
			want: []string{IndexFileName, "index JSON"},
		},
		{
			name: "duplicate tensor across shards",
			setup: func(t *testing.T, dir string) string {
				copyFile(t, "mixtral/model.safetensors", filepath.Join(dir, "model-00001-of-00002.safetensors"))
				copyFile(t, "mixtral/model.safetensors", filepath.Join(dir, "model-00002-of-00002.safetensors"))
				return dir
			},
			want: []string{"model-00002-of-00002.safetensors", `tensor "`, "duplicate tensor: already loaded from", "model-00001-of-00002.safetensors"},
			is:   ErrDuplicate,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := tc.setup(t, t.TempDir())
			c, err := Open(path)
			require.Error(t, err)
			assert.Nil(t, c)
			for _, w := range tc.want {
				require.ErrorContains(t, err, w)
			}
			assert.True(t, strings.HasPrefix(err.Error(), "store: "), err.Error())
			if tc.is != nil {
				assert.ErrorIs(t, err, tc.is)
			}
		})
	}
}

func TestAddFileErrors(t *testing.T) {
	dir := t.TempDir()
	c := New()
	defer c.Close()
	err := c.AddFile(dir)
	require.ErrorContains(t, err, "is a directory")
	err = c.AddFile(filepath.Join(dir, "missing.safetensors"))
	require.ErrorContains(t, err, "missing.safetensors")
	require.ErrorIs(t, err, fs.ErrNotExist)
	err = c.AddFile("/dev/null")
	require.ErrorContains(t, err, "/dev/null: not a regular file")

	// A failed AddFile registers nothing from that file.
	good := filepath.Join(dir, "good.safetensors")
	copyFile(t, "fused/model.safetensors", good)
	require.NoError(t, c.AddHost("model.layers.0.mlp.router.bias", dtype.U8, []int64{1}, []byte{1}))
	err = c.AddFile(good)
	require.ErrorIs(t, err, ErrDuplicate)
	assert.Equal(t, []string{"model.layers.0.mlp.router.bias"}, c.Names())
	assert.Empty(t, c.Files())
}

func TestOpenSymlinkedShards(t *testing.T) {
	// Hugging Face cache snapshots are directories of symlinks into blobs/.
	dir := t.TempDir()
	blobs := filepath.Join(dir, "blobs")
	snap := filepath.Join(dir, "snapshots", "rev")
	require.NoError(t, os.MkdirAll(snap, 0o755))
	for _, f := range []string{"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", IndexFileName} {
		copyFile(t, "qwen/"+f, filepath.Join(blobs, f+".blob"))
		rel, err := filepath.Rel(snap, filepath.Join(blobs, f+".blob"))
		require.NoError(t, err)
		require.NoError(t, os.Symlink(rel, filepath.Join(snap, f)))
	}
	c, err := Open(snap)
	require.NoError(t, err)
	defer c.Close()
	x, err := c.Experts()
	require.NoError(t, err)
	require.Len(t, x.Modules, 2)
	assert.Equal(t, 4, x.Modules[1].NumExperts)
}

func TestSamePath(t *testing.T) {
	dir := t.TempDir()
	f := writeFile(t, filepath.Join(dir, "a.safetensors"), []byte("x"))
	require.NoError(t, os.Symlink(f, filepath.Join(dir, "link.safetensors")))
	assert.True(t, samePath(f, filepath.Join(dir, ".", "a.safetensors")))
	assert.True(t, samePath(f, filepath.Join(dir, "link.safetensors")))
	assert.False(t, samePath(f, filepath.Join(dir, "b.safetensors")))
	wd, err := os.Getwd()
	require.NoError(t, err)
	assert.True(t, samePath(filepath.Join(wd, "testdata"), "testdata"))
}

func TestAddHost(t *testing.T) {
	c := New()
	defer c.Close()
	const E, I, H = 3, 2, 4
	gateUp := make([]byte, E*2*I*H*2) // bf16 [E, 2I, H]
	for i := range gateUp {
		gateUp[i] = byte(i)
	}
	down := make([]byte, E*H*I*2) // bf16 [E, H, I]
	for i := range down {
		down[i] = byte(255 - i)
	}
	require.NoError(t, c.AddHost("model.layers.10.mlp.experts.gate_up_proj", dtype.BF16, []int64{E, 2 * I, H}, gateUp))
	require.NoError(t, c.AddHost("model.layers.10.mlp.experts.down_proj", dtype.BF16, []int64{E, H, I}, down))
	per := map[string][]byte{}
	for e := 0; e < 2; e++ {
		for _, role := range []string{"w1.weight", "w2.weight"} {
			name := "model.layers.2.block_sparse_moe.experts." + string(rune('0'+e)) + "." + role
			data := make([]byte, 4*I*H)
			for i := range data {
				data[i] = byte(e*16 + len(role) + i)
			}
			per[name] = data
			require.NoError(t, c.AddHost(name, dtype.F32, []int64{I, H}, data))
		}
	}
	require.NoError(t, c.AddHost("model.layers.2.block_sparse_moe.gate.weight", dtype.F32, []int64{2, H}, make([]byte, 2*H*4)))
	require.NoError(t, c.AddHost("scalar", dtype.I64, nil, make([]byte, 8)))

	tn, ok := c.Tensor("scalar")
	require.True(t, ok)
	assert.Equal(t, HostSource, tn.Source)
	assert.Equal(t, int64(8), tn.NumBytes())
	assert.Empty(t, c.Files())

	x, err := c.Experts()
	require.NoError(t, err)
	require.Len(t, x.Modules, 2)
	// natural order: layers.2 before layers.10
	assert.Equal(t, "model.layers.2.block_sparse_moe", x.Modules[0].Prefix)
	assert.Equal(t, "model.layers.10.mlp", x.Modules[1].Prefix)

	fm := x.Modules[1]
	assert.True(t, fm.Fused)
	assert.Equal(t, E, fm.NumExperts)
	assert.Equal(t, []string{"down_proj", "gate_up_proj"}, fm.Roles)
	for e := 0; e < E; e++ {
		p, err := fm.Part(e, "gate_up_proj")
		require.NoError(t, err)
		n := 2 * I * H * 2
		assert.Equal(t, gateUp[e*n:(e+1)*n], p.Data)
		assert.Equal(t, []int64{2 * I, H}, p.Shape)
		assert.Equal(t, dtype.BF16, p.DType)
		assert.Equal(t, HostSource, p.Source)
		assert.Equal(t, int64(n), p.NumBytes())
		assert.Equal(t, n, cap(p.Data), "part must not expose the next expert's bytes")
		p, err = fm.Part(e, "down_proj")
		require.NoError(t, err)
		assert.Equal(t, down[e*H*I*2:(e+1)*H*I*2], p.Data)
	}
	pm := x.Modules[0]
	assert.False(t, pm.Fused)
	assert.Equal(t, 2, pm.NumExperts)
	assert.Equal(t, []string{"w1.weight", "w2.weight"}, pm.Roles)
	for name, data := range per {
		rest := strings.TrimPrefix(name, "model.layers.2.block_sparse_moe.experts.")
		p, err := pm.Part(int(rest[0]-'0'), rest[2:])
		require.NoError(t, err)
		assert.Equal(t, data, p.Data)
		assert.Equal(t, name, p.Tensor)
		assert.Equal(t, []int64{I, H}, p.Shape)
	}

	// Views share the caller's memory.
	gateUp[0] = 0xEE
	p, err := fm.Part(0, "gate_up_proj")
	require.NoError(t, err)
	assert.Equal(t, byte(0xEE), p.Data[0])
}

func TestAddHostErrors(t *testing.T) {
	c := New()
	defer c.Close()
	require.NoError(t, c.AddHost("a", dtype.F16, []int64{2, 2}, make([]byte, 8)))
	tests := []struct {
		name  string
		tname string
		dt    dtype.DType
		shape []int64
		data  []byte
		want  string
		is    error
	}{
		{"empty name", "", dtype.F32, []int64{1}, make([]byte, 4), "empty tensor name", nil},
		{"invalid dtype", "b", dtype.Invalid, []int64{1}, make([]byte, 4), "invalid dtype Invalid", nil},
		{"negative dim", "b", dtype.F32, []int64{2, -1}, nil, "negative dimension in shape [2 -1]", nil},
		{"overflow", "b", dtype.F32, []int64{1 << 62, 4}, nil, "overflows int64 bytes", nil},
		{"size mismatch", "b", dtype.BF16, []int64{3, 2}, make([]byte, 10), `host: tensor "b": data is 10 bytes but shape [3 2] of BF16 needs 12`, nil},
		{"duplicate", "a", dtype.F16, []int64{4}, make([]byte, 8), `tensor "a": duplicate tensor: already loaded from host`, ErrDuplicate},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := c.AddHost(tc.tname, tc.dt, tc.shape, tc.data)
			require.ErrorContains(t, err, tc.want)
			if tc.is != nil {
				assert.ErrorIs(t, err, tc.is)
			}
		})
	}
	assert.Equal(t, []string{"a"}, c.Names())
}

func TestClose(t *testing.T) {
	c, err := Open(filepath.Join("testdata", "qwen"))
	require.NoError(t, err)
	require.NoError(t, c.AddHost("h", dtype.U8, []int64{1}, []byte{7}))
	require.Len(t, c.Files(), 2)

	require.NoError(t, c.Close())
	require.ErrorIs(t, c.Close(), ErrClosed)
	require.ErrorIs(t, c.Close(), ErrClosed)
	require.ErrorIs(t, c.AddFile(filepath.Join("testdata", "fused", "model.safetensors")), ErrClosed)
	require.ErrorIs(t, c.AddHost("x", dtype.U8, []int64{1}, []byte{1}), ErrClosed)
	_, err = c.Experts()
	require.ErrorIs(t, err, ErrClosed)
	_, ok := c.Tensor("h")
	assert.False(t, ok)
	assert.Empty(t, c.Names())
	assert.Empty(t, c.Files())
	assert.Equal(t, "store: checkpoint is closed", ErrClosed.Error())

	// Closing an empty checkpoint works too.
	require.NoError(t, New().Close())
}

func TestConcurrentReaders(t *testing.T) {
	c, err := Open(filepath.Join("testdata", "mixtral"))
	require.NoError(t, err)
	defer c.Close()
	names := c.Names()
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < 50; i++ {
				n := names[(g*7+i)%len(names)]
				tn, ok := c.Tensor(n)
				if !ok || sha(tn.Bytes()) == "" {
					errs <- errors.New("lookup failed: " + n)
					return
				}
				x, err := c.Experts()
				if err != nil {
					errs <- err
					return
				}
				if _, err := x.Modules[i%2].Part(i%4, "w2.weight"); err != nil {
					errs <- err
					return
				}
				_ = c.Files()
			}
		}(g)
	}
	wg.Add(1)
	go func() { // a writer adding host tensors meanwhile
		defer wg.Done()
		for i := 0; i < 50; i++ {
			if err := c.AddHost("host."+string(rune('a'+i%26))+string(rune('a'+i/26)), dtype.U8, []int64{1}, []byte{byte(i)}); err != nil {
				errs <- err
				return
			}
		}
	}()
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	assert.Len(t, c.Names(), len(names)+50)
}
