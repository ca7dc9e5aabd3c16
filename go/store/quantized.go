package store

import (
	"fmt"
	"slices"
	"sort"
	"strings"

	"github.com/moe-infinity/moe_infinity/go/dtype"
)

// QuantFormat is how a quantized expert weight is stored.
type QuantFormat uint8

const (
	// FP8Block is a float8_e4m3fn weight [rows, cols] with a float32 (or
	// bf16) weight_scale_inv grid [ceil(rows/b0), ceil(cols/b1)] for the
	// checkpoint's weight_block_size [b0, b1] (DeepSeek-V3/R1, Qwen3-*-FP8).
	// Per-expert roles "<name>.weight" + "<name>.weight_scale_inv"; fused
	// roles "<name>" + "<name>_scale_inv".
	FP8Block QuantFormat = iota + 1
	// MXFP4 is a U8 blocks tensor [rows, cols/32, 16] (two e2m1 values per
	// byte) with U8 e8m0 scales [rows, cols/32] (gpt-oss): roles
	// "<name>_blocks" + "<name>_scales".
	MXFP4
)

// String returns "fp8" or "mxfp4", the quant_method names.
func (f QuantFormat) String() string {
	switch f {
	case FP8Block:
		return "fp8"
	case MXFP4:
		return "mxfp4"
	}
	return fmt.Sprintf("QuantFormat(%d)", uint8(f))
}

// QuantWeight describes one quantized weight that every expert of a module
// has, pairing the role holding the quantized values with the role holding
// their scales.
type QuantWeight struct {
	// Name is the weight's name without quantization suffixes, e.g.
	// "gate_proj" (per-expert FP8) or "gate_up_proj" (fused MXFP4).
	Name string
	// Format is the storage format.
	Format QuantFormat
	// WeightRole and ScaleRole are the module roles (see MoEModule.Roles)
	// holding the quantized values and the scales.
	WeightRole, ScaleRole string
	// Rows and Cols are the per-expert shape of the dequantized weight in
	// elements, in checkpoint order ([out_features, in_features] for FP8;
	// for MXFP4 rows is dimension 1 of the fused tensor and cols the packed
	// dimension, 32 per block).
	Rows, Cols int64
	// ScaleRows and ScaleCols are the per-expert scale grid in elements.
	ScaleRows, ScaleCols int64
}

// CheckFP8Block reports whether an FP8Block weight's scale grid is the one
// weight_block_size [blockRows, blockCols] gives:
// [ceil(Rows/blockRows), ceil(Cols/blockCols)]. The error names the weight,
// the shapes and the block.
func (q QuantWeight) CheckFP8Block(blockRows, blockCols int64) error {
	if q.Format != FP8Block {
		return fmt.Errorf("store: %s weight %q has no FP8 block size", q.Format, q.Name)
	}
	if blockRows <= 0 || blockCols <= 0 {
		return fmt.Errorf("store: weight_block_size [%d, %d] must be positive", blockRows, blockCols)
	}
	wr, wc := ceilDiv64(q.Rows, blockRows), ceilDiv64(q.Cols, blockCols)
	if wr != q.ScaleRows || wc != q.ScaleCols {
		return fmt.Errorf("store: FP8 weight %q [%d, %d] with weight_block_size [%d, %d] needs a [%d, %d] %s grid, the checkpoint has [%d, %d]",
			q.Name, q.Rows, q.Cols, blockRows, blockCols, wr, wc, q.ScaleRole, q.ScaleRows, q.ScaleCols)
	}
	return nil
}

func ceilDiv64(a, b int64) int64 {
	if a == 0 {
		return 0
	}
	return (a-1)/b + 1
}

// QuantPart is one expert's quantized weight with its scales.
type QuantPart struct {
	QuantWeight
	// Weight is the expert's quantized values (F8_E4M3 [Rows, Cols], or U8
	// [Rows, Cols/32, 16] for MXFP4).
	Weight Part
	// Scales is the expert's scales (F32 or BF16 [ScaleRows, ScaleCols], or
	// U8 e8m0 [Rows, Cols/32] for MXFP4).
	Scales Part
}

// QuantWeight returns the module's quantized weight called name (see
// QuantWeight.Name); the error wraps ErrNotFound.
func (m *MoEModule) QuantWeight(name string) (QuantWeight, error) {
	i := sort.Search(len(m.Quant), func(i int) bool { return m.Quant[i].Name >= name })
	if i == len(m.Quant) || m.Quant[i].Name != name {
		names := make([]string, len(m.Quant))
		for j, q := range m.Quant {
			names[j] = q.Name
		}
		why := ""
		if issue, ok := m.quantIssues[name]; ok {
			why = ": " + issue
		}
		return QuantWeight{}, fmt.Errorf("store: MoE module %q: no quantized weight %q (quantized: [%s])%s: %w",
			m.Prefix, name, strings.Join(names, ", "), why, ErrNotFound)
	}
	return m.Quant[i], nil
}

// QuantPart returns expert's quantized weight called name with its scales.
// Errors wrap ErrNotFound.
func (m *MoEModule) QuantPart(expert int, name string) (QuantPart, error) {
	q, err := m.QuantWeight(name)
	if err != nil {
		return QuantPart{}, err
	}
	w, err := m.Part(expert, q.WeightRole)
	if err != nil {
		return QuantPart{}, err
	}
	s, err := m.Part(expert, q.ScaleRole)
	if err != nil {
		return QuantPart{}, err
	}
	return QuantPart{QuantWeight: q, Weight: w, Scales: s}, nil
}

// roleInfo is a role's per-expert dtype and shape, and a tensor for
// messages.
type roleInfo struct {
	dt    dtype.DType
	shape []int64
	t     *Tensor
}

func (m *MoEModule) roleInfos() map[string]roleInfo {
	out := make(map[string]roleInfo, len(m.Roles))
	for i, r := range m.Roles {
		if m.Fused {
			t := m.fused[i]
			out[r] = roleInfo{t.DType, t.Shape[1:], t}
		} else {
			t := m.experts[0][i]
			out[r] = roleInfo{t.DType, t.Shape, t}
		}
	}
	return out
}

// fp8ScaleSuffix returns the suffix pairing a scale role with its weight
// role in the module's layout.
func fp8Names(fused bool) (weightSuffix, scaleSuffix string) {
	if fused {
		return "", "_scale_inv"
	}
	return ".weight", ".weight_scale_inv"
}

// indexQuant fills m.Quant from the roles that pair up as a quantized
// weight and its scales. Indexing never fails: roles that look quantized but
// do not fit a format (values without scales, wrong dtypes or shapes) stay
// plain roles, and the reason is kept for QuantWeight's error, so a
// checkpoint is only rejected when its quantized weights are asked for.
func (m *MoEModule) indexQuant() {
	infos := m.roleInfos()
	wSuf, sSuf := fp8Names(m.Fused)
	m.quantIssues = map[string]string{}
	for _, r := range m.Roles {
		info := infos[r]
		var name string
		var q QuantWeight
		var err error
		switch {
		case strings.HasSuffix(r, sSuf):
			name = strings.TrimSuffix(r, sSuf)
			wr := name + wSuf
			wi, ok := infos[wr]
			if !ok {
				err = fmt.Errorf("FP8 scales %q have no weight role %q", r, wr)
				break
			}
			q, err = fp8Weight(name, wr, r, wi, info)
		case strings.HasSuffix(r, "_blocks"):
			name = strings.TrimSuffix(r, "_blocks")
			sr := name + "_scales"
			si, ok := infos[sr]
			if !ok {
				err = fmt.Errorf("MXFP4 blocks %q have no scales role %q", r, sr)
				break
			}
			q, err = mxfp4Weight(name, r, sr, info, si)
		case info.dt == dtype.F8E4M3 || info.dt == dtype.F8E5M2:
			name = strings.TrimSuffix(r, wSuf)
			if _, ok := infos[name+sSuf]; !ok {
				err = fmt.Errorf("role %q is %s but has no %q scales (per-tensor FP8 is not supported)", r, info.dt, name+sSuf)
			}
		default:
			continue
		}
		if err != nil {
			m.quantIssues[name] = err.Error()
		} else if q.Format != 0 {
			m.Quant = append(m.Quant, q)
		}
	}
	sort.Slice(m.Quant, func(i, j int) bool { return m.Quant[i].Name < m.Quant[j].Name })
}

func fp8Weight(name, wr, sr string, w, s roleInfo) (QuantWeight, error) {
	if w.dt != dtype.F8E4M3 {
		return QuantWeight{}, fmt.Errorf("FP8 weight %q is %s, want F8_E4M3", wr, w.dt)
	}
	if s.dt != dtype.F32 && s.dt != dtype.BF16 {
		return QuantWeight{}, fmt.Errorf("FP8 scales %q are %s, want F32 (or BF16)", sr, s.dt)
	}
	if len(w.shape) != 2 || len(s.shape) != 2 {
		return QuantWeight{}, fmt.Errorf("FP8 weight %q %v and scales %q %v must both be 2-D per expert (block-scaled; per-tensor scales are not supported)", wr, w.shape, sr, s.shape)
	}
	for d := 0; d < 2; d++ {
		if (w.shape[d] == 0) != (s.shape[d] == 0) || s.shape[d] > w.shape[d] {
			return QuantWeight{}, fmt.Errorf("FP8 scales %q %v cannot be a block grid of weight %q %v", sr, s.shape, wr, w.shape)
		}
	}
	return QuantWeight{Name: name, Format: FP8Block, WeightRole: wr, ScaleRole: sr,
		Rows: w.shape[0], Cols: w.shape[1], ScaleRows: s.shape[0], ScaleCols: s.shape[1]}, nil
}

func mxfp4Weight(name, br, sr string, b, s roleInfo) (QuantWeight, error) {
	if b.dt != dtype.U8 || s.dt != dtype.U8 {
		return QuantWeight{}, fmt.Errorf("MXFP4 blocks %q (%s) and scales %q (%s) must be U8", br, b.dt, sr, s.dt)
	}
	n := len(b.shape)
	if n != 3 || b.shape[n-1] != 16 || len(s.shape) != 2 || !slices.Equal(b.shape[:n-1], s.shape) {
		return QuantWeight{}, fmt.Errorf("MXFP4 blocks %q %v and scales %q %v must be [rows, groups, 16] and [rows, groups] per expert", br, b.shape, sr, s.shape)
	}
	return QuantWeight{Name: name, Format: MXFP4, WeightRole: br, ScaleRole: sr,
		Rows: b.shape[0], Cols: b.shape[1] * 32, ScaleRows: s.shape[0], ScaleCols: s.shape[1]}, nil
}
