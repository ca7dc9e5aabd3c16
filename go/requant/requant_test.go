package requant

import (
	"encoding/binary"
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"sort"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/dtype"
	"github.com/moe-infinity/moe_infinity/go/quant"
	"github.com/moe-infinity/moe_infinity/go/store"
)

// tensor is a test tensor: little-endian bytes of dt.
type tensor struct {
	dt    dtype.DType
	shape []int64
	data  []byte
}

// bf16s makes a bf16 tensor of shape whose element i is f(i).
func bf16s(shape []int64, f func(i int) float32) tensor {
	n := 1
	for _, d := range shape {
		n *= int(d)
	}
	b := make([]byte, 2*n)
	for i := 0; i < n; i++ {
		binary.LittleEndian.PutUint16(b[2*i:], dtype.F32BitsToBF16(math.Float32bits(f(i))))
	}
	return tensor{dtype.BF16, shape, b}
}

// writeSafetensors writes tensors as one safetensors file.
func writeSafetensors(t *testing.T, path string, ts map[string]tensor) {
	t.Helper()
	names := make([]string, 0, len(ts))
	for n := range ts {
		names = append(names, n)
	}
	sort.Strings(names)
	h := map[string]any{}
	var off int64
	var data []byte
	for _, n := range names {
		x := ts[n]
		h[n] = map[string]any{"dtype": x.dt.String(), "shape": x.shape, "data_offsets": []int64{off, off + int64(len(x.data))}}
		off += int64(len(x.data))
		data = append(data, x.data...)
	}
	j, err := json.Marshal(h)
	require.NoError(t, err)
	out := binary.LittleEndian.AppendUint64(nil, uint64(len(j)))
	require.NoError(t, os.MkdirAll(filepath.Dir(path), 0o755))
	require.NoError(t, os.WriteFile(path, append(append(out, j...), data...), 0o644))
}

func wave(seed float64) func(int) float32 {
	return func(i int) float32 { return float32(math.Sin(float64(i)*0.7+seed) * 0.05 * (1 + float64(i%13))) }
}

// perExpert is a Mixtral-like source: 3 experts with w1 [130, 200] (partial
// blocks on both axes) and a bias, plus a dense tensor that is not copied.
func perExpert(t *testing.T, dir string) {
	ts := map[string]tensor{"model.embed_tokens.weight": bf16s([]int64{4, 8}, wave(9))}
	for e := 0; e < 3; e++ {
		p := "model.layers.0.block_sparse_moe.experts." + string(rune('0'+e)) + "."
		ts[p+"w1.weight"] = bf16s([]int64{130, 200}, wave(float64(e)))
		ts[p+"w1.bias"] = bf16s([]int64{130}, wave(float64(e)+0.5))
	}
	writeSafetensors(t, filepath.Join(dir, "model.safetensors"), ts)
}

func open(t *testing.T, dir string) *store.MoEModule {
	t.Helper()
	c, err := store.Open(dir)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	idx, err := c.Experts()
	require.NoError(t, err)
	require.Len(t, idx.Modules, 1)
	return idx.Modules[0]
}

func TestPerExpertShardsAreQuantFP8BlockOfTheSource(t *testing.T) {
	src, out := t.TempDir(), filepath.Join(t.TempDir(), "fp8")
	perExpert(t, src)
	var last, total int64
	res, err := FP8(Options{Source: src, Dir: out, Key: "v1", Workers: 2, Progress: func(d, tot int64) {
		require.GreaterOrEqual(t, d, last)
		last, total = d, tot
	}})
	require.NoError(t, err)
	assert.False(t, res.Reused)
	assert.Equal(t, [2]int{128, 128}, res.WeightBlockSize)
	assert.Equal(t, "fp8", res.QuantMethod)
	assert.Equal(t, 1, res.Files)
	assert.Equal(t, 3, res.Quantized)
	assert.Equal(t, 9, res.Tensors) // 3 × (weight, scales, bias)
	assert.Equal(t, total, last, "progress reaches the total")
	assert.Equal(t, res.SourceBytes, total)
	assert.Equal(t, int64(3*(130*200*2+130*2)), res.SourceBytes)

	srcMod, got := open(t, src), open(t, out)
	require.Len(t, got.Quant, 1)
	q := got.Quant[0]
	assert.Equal(t, store.QuantWeight{Name: "w1", Format: store.FP8Block, WeightRole: "w1.weight", ScaleRole: "w1.weight_scale_inv",
		Rows: 130, Cols: 200, ScaleRows: 2, ScaleCols: 2}, q)
	require.NoError(t, q.CheckFP8Block(128, 128))
	for e := 0; e < 3; e++ {
		sp, err := srcMod.Part(e, "w1.weight")
		require.NoError(t, err)
		qp, err := got.QuantPart(e, "w1")
		require.NoError(t, err)
		w, s := make([]byte, 130*200), make([]byte, 4*2*2)
		require.NoError(t, quant.QuantFP8Block(w, s, sp.Data, dtype.BF16, 130, 200, DefaultBlock))
		assert.Equal(t, w, qp.Weight.Data, "expert %d weight", e)
		assert.Equal(t, s, qp.Scales.Data, "expert %d scales", e)
		// Dequantized, within FP8's half step of the source.
		back := make([]byte, 4*130*200)
		require.NoError(t, quant.DequantFP8Block(back, dtype.F32, qp.Weight.Data, qp.Scales.Data, dtype.F32, 130, 200, DefaultBlock))
		for i := 0; i < 130*200; i++ {
			x := math.Float32frombits(dtype.BF16ToF32Bits(binary.LittleEndian.Uint16(sp.Data[2*i:])))
			y := math.Float32frombits(binary.LittleEndian.Uint32(back[4*i:]))
			require.InDelta(t, x, y, math.Abs(float64(x))/16+1e-3/448, "expert %d element %d", e, i)
		}
		sb, err := srcMod.Part(e, "w1.bias")
		require.NoError(t, err)
		gb, err := got.Part(e, "w1.bias")
		require.NoError(t, err)
		assert.Equal(t, sb.Data, gb.Data, "biases are copied")
		assert.Equal(t, dtype.BF16, gb.DType)
	}
	c, err := store.Open(out)
	require.NoError(t, err)
	defer c.Close()
	_, dense := c.Tensor("model.embed_tokens.weight")
	assert.False(t, dense, "only routed experts are written")
}

func TestFusedExperts(t *testing.T) {
	src, out := t.TempDir(), filepath.Join(t.TempDir(), "fp8")
	writeSafetensors(t, filepath.Join(src, "model.safetensors"), map[string]tensor{
		"model.layers.0.mlp.experts.gate_up_proj":      bf16s([]int64{4, 64, 48}, wave(1)),
		"model.layers.0.mlp.experts.gate_up_proj_bias": bf16s([]int64{4, 64}, wave(2)),
		"model.layers.0.mlp.experts.down_proj":         bf16s([]int64{4, 48, 32}, wave(3)),
	})
	res, err := FP8(Options{Source: src, Dir: out, Key: "k", Block: quant.Block{Rows: 16, Cols: 32}})
	require.NoError(t, err)
	assert.Equal(t, 2, res.Quantized)
	srcMod, got := open(t, src), open(t, out)
	require.True(t, got.Fused)
	require.Len(t, got.Quant, 2)
	for _, q := range got.Quant {
		require.NoError(t, q.CheckFP8Block(16, 32), q.Name)
		for e := 0; e < 4; e++ {
			sp, err := srcMod.Part(e, q.Name)
			require.NoError(t, err)
			qp, err := got.QuantPart(e, q.Name)
			require.NoError(t, err)
			w, s := make([]byte, q.Rows*q.Cols), make([]byte, 4*q.ScaleRows*q.ScaleCols)
			require.NoError(t, quant.QuantFP8Block(w, s, sp.Data, dtype.BF16, int(q.Rows), int(q.Cols), quant.Block{Rows: 16, Cols: 32}))
			assert.Equal(t, w, qp.Weight.Data, "%s expert %d", q.Name, e)
			assert.Equal(t, s, qp.Scales.Data, "%s expert %d", q.Name, e)
		}
	}
	sb, err := srcMod.Part(3, "gate_up_proj_bias")
	require.NoError(t, err)
	gb, err := got.Part(3, "gate_up_proj_bias")
	require.NoError(t, err)
	assert.Equal(t, sb.Data, gb.Data)
}

func stat(t *testing.T, dir string) os.FileInfo {
	t.Helper()
	st, err := os.Stat(filepath.Join(dir, "experts-00001-of-00001.safetensors"))
	require.NoError(t, err)
	return st
}

func TestReuseAndInvalidation(t *testing.T) {
	src, out := t.TempDir(), filepath.Join(t.TempDir(), "fp8")
	perExpert(t, src)
	first, err := FP8(Options{Source: src, Dir: out, Key: "v1"})
	require.NoError(t, err)
	before := stat(t, out)

	again, err := FP8(Options{Source: src, Dir: out, Key: "v1", Progress: func(int64, int64) { t.Fatal("a reused copy reports no work") }})
	require.NoError(t, err)
	assert.True(t, again.Reused)
	again.Reused = false
	assert.Equal(t, first, again)
	now := stat(t, out)
	assert.True(t, os.SameFile(before, now) && before.ModTime().Equal(now.ModTime()), "the shard is not rewritten")

	// In order: each case changes one thing from the one before.
	for _, tc := range []struct {
		name   string
		change func() Options
	}{
		{"key", func() Options { return Options{Source: src, Dir: out, Key: "v2"} }},
		{"block", func() Options {
			return Options{Source: src, Dir: out, Key: "v2", Block: quant.Block{Rows: 64, Cols: 64}}
		}},
		{"source rewritten", func() Options {
			// Same names and sizes; only the contents (and so the mtime) change.
			perExpert(t, src)
			return Options{Source: src, Dir: out, Key: "v2", Block: quant.Block{Rows: 64, Cols: 64}}
		}},
		{"shard truncated", func() Options {
			p := filepath.Join(out, "experts-00001-of-00001.safetensors")
			st, err := os.Stat(p)
			require.NoError(t, err)
			require.NoError(t, os.Truncate(p, st.Size()-1))
			return Options{Source: src, Dir: out, Key: "v2", Block: quant.Block{Rows: 64, Cols: 64}}
		}},
	} {
		name, change := tc.name, tc.change
		old := stat(t, out)
		time.Sleep(10 * time.Millisecond) // a rewrite gets a later mtime
		res, err := FP8(change())
		require.NoError(t, err, name)
		assert.False(t, res.Reused, name)
		assert.True(t, stat(t, out).ModTime().After(old.ModTime()), "%s: the shard is rewritten", name)
		open(t, out)
	}
}

func TestAnInterruptedRunIsNeverTrusted(t *testing.T) {
	src, out := t.TempDir(), filepath.Join(t.TempDir(), "fp8")
	perExpert(t, src)
	_, err := FP8(Options{Source: src, Dir: out, Key: "v1"})
	require.NoError(t, err)
	// A run for another version stops after clearing the manifest and
	// leaving a temporary shard behind.
	require.NoError(t, os.Remove(filepath.Join(out, ManifestName)))
	tmp := filepath.Join(out, ".experts-00001-of-00001.safetensors"+tmpInfix+"123")
	require.NoError(t, os.WriteFile(tmp, []byte("half"), 0o644))
	res, err := FP8(Options{Source: src, Dir: out, Key: "v1"})
	require.NoError(t, err)
	assert.False(t, res.Reused, "no manifest: rewritten")
	assert.NoFileExists(t, tmp, "temporary files are removed")
	entries, err := os.ReadDir(out)
	require.NoError(t, err)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	assert.ElementsMatch(t, []string{ManifestName, store.IndexFileName, "experts-00001-of-00001.safetensors"}, names)
}

func TestErrors(t *testing.T) {
	fp8 := t.TempDir()
	writeSafetensors(t, filepath.Join(fp8, "model.safetensors"), map[string]tensor{
		"m.experts.0.w1.weight":           {dtype.F8E4M3, []int64{2, 2}, make([]byte, 4)},
		"m.experts.0.w1.weight_scale_inv": {dtype.F32, []int64{1, 1}, make([]byte, 4)},
	})
	_, err := FP8(Options{Source: fp8, Dir: filepath.Join(t.TempDir(), "o")})
	require.ErrorIs(t, err, ErrSource)
	assert.ErrorContains(t, err, "F8_E4M3")

	dense := t.TempDir()
	writeSafetensors(t, filepath.Join(dense, "model.safetensors"), map[string]tensor{"w": bf16s([]int64{2}, wave(0))})
	_, err = FP8(Options{Source: dense, Dir: filepath.Join(t.TempDir(), "o")})
	require.ErrorIs(t, err, ErrSource)

	nan := t.TempDir()
	writeSafetensors(t, filepath.Join(nan, "model.safetensors"), map[string]tensor{
		"m.experts.0.w1.weight": bf16s([]int64{2, 2}, func(i int) float32 { return float32(math.NaN()) }),
	})
	_, err = FP8(Options{Source: nan, Dir: filepath.Join(t.TempDir(), "o")})
	assert.ErrorContains(t, err, "m.experts.0.w1.weight")

	src := t.TempDir()
	perExpert(t, src)
	_, err = FP8(Options{Source: src, Dir: src})
	assert.ErrorContains(t, err, "checkpoint's own")
	_, err = FP8(Options{Source: filepath.Join(src, "model.safetensors"), Dir: src})
	assert.ErrorContains(t, err, "checkpoint's own")
	_, err = FP8(Options{Source: src, Dir: t.TempDir(), Block: quant.Block{Rows: -1, Cols: 2}})
	assert.Error(t, err)
	_, err = FP8(Options{Source: filepath.Join(src, "missing"), Dir: t.TempDir()})
	assert.ErrorIs(t, err, os.ErrNotExist)
}
