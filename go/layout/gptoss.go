package layout

import (
	"fmt"

	"github.com/moe-infinity/moe_infinity/go/dtype"
	"github.com/moe-infinity/moe_infinity/go/store"
)

// gpt-oss experts (transformers' GptOssExperts) keep four tensors an
// expert, as the checkpoint fuses them: gate_up_proj [H, 2I] (gate and up
// columns interleaved), gate_up_proj_bias [2I], down_proj [I, H] and
// down_proj_bias [H]. The releases ship the two matrices as MXFP4
// (gate_up_proj_blocks [2I, H/32, 16] and gate_up_proj_scales [2I, H/32],
// down_proj's [H, I/32, 16] and [H, I/32]: the transposes), the biases in
// bfloat16.

// GptOssRegions are the names of the four regions a gpt-oss slot image (or
// view image, for MXFP4 experts) has: the parameter names of
// GptOssExperts.
var GptOssRegions = [4]string{"gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"}

// GptOssKernel is how expert kernels read gpt-oss experts straight from the
// slot image (backend.GptOssArgs). Offsets are bytes from the slot's start.
type GptOssKernel struct {
	// Hidden and Inter are the FFN sizes H and I.
	Hidden, Inter int64
	// DType is the activations' (and biases') type, dtype.BF16 or
	// dtype.F16: the matrices' for bfloat16/float16 experts, the views'
	// for MXFP4 ones.
	DType dtype.DType
	// MXFP4 says the matrices are MXFP4 blocks with e8m0 scales.
	MXFP4 bool
	// GateUp and Down are the offsets of the matrices: gate_up_proj
	// [H, 2I] and down_proj [I, H] in DType, or for MXFP4 their blocks
	// [2I, H/32, 16] and [H, I/32, 16].
	GateUp, Down int64
	// GateUpBias [2I] and DownBias [H] are the offsets of the biases, in
	// DType.
	GateUpBias, DownBias int64
	// GateUpScale [2I, H/32] and DownScale [H, I/32] are the offsets of the
	// MXFP4 e8m0 scales (0 unless MXFP4).
	GateUpScale, DownScale int64
}

// gptOssShapes checks the four regions' shapes ([H, 2I], [2I], [I, H],
// [H], of one float dtype) and returns H, I and the dtype.
func gptOssShapes(l *Layout) (hidden, inter int64, dt dtype.DType, regs [4]Region, err error) {
	for i, name := range GptOssRegions {
		r, ok := l.Region(name)
		if !ok {
			return 0, 0, 0, regs, fmt.Errorf("the gpt-oss expert kernels need a %q region", name)
		}
		regs[i] = r
	}
	gu, gb, dn, db := regs[0], regs[1], regs[2], regs[3]
	if len(gu.Shape) != 2 || gu.Shape[1]%2 != 0 {
		return 0, 0, 0, regs, fmt.Errorf("the gpt-oss expert kernels need gate_up_proj [H, 2I] (got %v)", gu.Shape)
	}
	hidden, inter = gu.Shape[0], gu.Shape[1]/2
	if len(gb.Shape) != 1 || gb.Shape[0] != 2*inter || len(dn.Shape) != 2 || dn.Shape[0] != inter || dn.Shape[1] != hidden ||
		len(db.Shape) != 1 || db.Shape[0] != hidden {
		return 0, 0, 0, regs, fmt.Errorf("the gpt-oss expert kernels need gate_up_proj [H, 2I] = [%d, %d], gate_up_proj_bias [2I], down_proj [I, H] and down_proj_bias [H] (got %v, %v, %v and %v)",
			hidden, 2*inter, gu.Shape, gb.Shape, dn.Shape, db.Shape)
	}
	dt = gu.dt
	if dt != dtype.BF16 && dt != dtype.F16 {
		return 0, 0, 0, regs, fmt.Errorf("the gpt-oss expert kernels take bfloat16 or float16 experts, not %s", gu.DType)
	}
	for _, r := range regs[1:] {
		if r.dt != dt {
			return 0, 0, 0, regs, fmt.Errorf("the gpt-oss expert kernels need every region in one dtype: %s is %s, %s is %s", gu.Name, gu.DType, r.Name, r.DType)
		}
	}
	return hidden, inter, dt, regs, nil
}

// GptOssKernel describes bfloat16/float16 gpt-oss experts as kernels read
// them from l's slot image, or says why kernels cannot.
func (l *Layout) GptOssKernel() (GptOssKernel, error) {
	hidden, inter, dt, regs, err := gptOssShapes(l)
	if err != nil {
		return GptOssKernel{}, err
	}
	return GptOssKernel{Hidden: hidden, Inter: inter, DType: dt,
		GateUp: regs[0].Offset, GateUpBias: regs[1].Offset, Down: regs[2].Offset, DownBias: regs[3].Offset}, nil
}

// GptOssKernel describes MXFP4 gpt-oss experts as kernels read them from
// the slot image (their blocks, scales and biases as the checkpoint stores
// them), with the views' shapes and dtype, or says why kernels cannot: the
// format is not MXFP4, a matrix is not one MXFP4 weight, or a bias is not
// stored in the views' dtype.
func (v *Views) GptOssKernel() (GptOssKernel, error) {
	if v.Method != store.MXFP4.String() {
		return GptOssKernel{}, fmt.Errorf("the gpt-oss expert kernels read MXFP4 or bfloat16/float16 experts, not %s", v.Method)
	}
	hidden, inter, dt, _, err := gptOssShapes(v.Layout)
	if err != nil {
		return GptOssKernel{}, err
	}
	var parts [4]viewPart
	for i, name := range GptOssRegions {
		for ri, r := range v.Layout.Regions {
			if r.Name == name {
				if len(v.parts[ri]) != 1 {
					return GptOssKernel{}, fmt.Errorf("region %q is made of %d parts; the gpt-oss expert kernels read one", name, len(v.parts[ri]))
				}
				parts[i] = v.parts[ri][0]
			}
		}
	}
	k := GptOssKernel{Hidden: hidden, Inter: inter, DType: dt, MXFP4: true}
	for i, want := range [4]bool{true, false, true, false} {
		p, name := parts[i], GptOssRegions[i]
		src := v.slot.Regions[p.src]
		if (p.q != nil) != want {
			return GptOssKernel{}, fmt.Errorf("the gpt-oss expert kernels need %s quantized (%t) and got %t", name, want, p.q != nil)
		}
		if p.q == nil && src.dt != dt {
			return GptOssKernel{}, fmt.Errorf("the gpt-oss expert kernels read %s as stored, %s, but the activations are %s", name, src.DType, dt.TorchName())
		}
		if p.q != nil && p.q.Format != store.MXFP4 {
			return GptOssKernel{}, fmt.Errorf("the gpt-oss expert kernels read MXFP4 matrices, and %s is %s", name, p.q.Format)
		}
		switch i {
		case 0:
			k.GateUp, k.GateUpScale = src.Offset, v.slot.Regions[p.scales].Offset
		case 1:
			k.GateUpBias = src.Offset
		case 2:
			k.Down, k.DownScale = src.Offset, v.slot.Regions[p.scales].Offset
		case 3:
			k.DownBias = src.Offset
		}
	}
	return k, nil
}
