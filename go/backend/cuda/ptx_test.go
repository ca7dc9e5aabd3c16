package cuda

// These tests need no GPU: they read the embedded PTX and model the sm_89
// build's hardware conversion on the CPU. In the CPU build (no cuda tag)
// they run with `go test ./go/backend/cuda/`.

import (
	"errors"
	"math"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/backend"
	"github.com/moe-infinity/moe_infinity/go/dtype"
)

// The kernels the backend looks up by name (backend.go, views.go,
// mapped.go, copymode.go, link.go) are in both builds.
var kernelNames = []string{
	"moe_gate_up_swiglu", "moe_down", "moe_gate_up_swiglu_fp8", "moe_down_fp8", "moe_table_set",
	"moe_publish_wait", "moe_answer", "moe_link_read", "moe_view_convert", "moe_view_fp8", "moe_view_mxfp4t",
	"moe_gate_up_gptoss", "moe_down_gptoss", "moe_gate_up_gptoss_mxfp4", "moe_down_gptoss_mxfp4",
}

func TestBothPTXBuildsAreEmbedded(t *testing.T) {
	target := regexp.MustCompile(`(?m)^\.target (\S+)$`)
	version := regexp.MustCompile(`(?m)^\.version (\S+)$`)
	for _, tc := range []struct {
		build, ptx, target, version string
		hardwareFP8                 bool
	}{
		{BuildSM80, moeFFNPTX, "sm_80", "7.0", false},
		{BuildSM89, moeFFNSM89PTX, "sm_89", "8.1", true},
	} {
		t.Run(tc.build, func(t *testing.T) {
			require.NotEmpty(t, tc.ptx)
			m := target.FindStringSubmatch(tc.ptx)
			require.NotNil(t, m, "no .target line")
			assert.Equal(t, tc.target, m[1])
			v := version.FindStringSubmatch(tc.ptx)
			require.NotNil(t, v, "no .version line")
			assert.Equal(t, tc.version, v[1])
			assert.Equal(t, tc.hardwareFP8, strings.Contains(tc.ptx, "cvt.rn.f16x2.e4m3x2"), "hardware e4m3 conversion")
			for _, k := range kernelNames {
				assert.Contains(t, tc.ptx, ".visible .entry "+k+"(", "kernel %s", k)
			}
		})
	}
}

func TestSelectPTX(t *testing.T) {
	for _, tc := range []struct {
		name         string
		build        string
		major, minor int
		want         string // PTX, when no error
		err          string
		unsupported  bool
	}{
		{"default on an A100", "", 8, 0, moeFFNPTX, "", false},
		{"default on an H100", "", 9, 0, moeFFNPTX, "", false},
		{"sm80 on an H100", BuildSM80, 9, 0, moeFFNPTX, "", false},
		{"sm89 on an L40S", BuildSM89, 8, 9, moeFFNSM89PTX, "", false},
		{"sm89 on an H100", BuildSM89, 9, 0, moeFFNSM89PTX, "", false},
		{"sm89 on a B200", BuildSM89, 10, 0, moeFFNSM89PTX, "", false},
		{"sm89 on an A100", BuildSM89, 8, 0, "", `kernel_build "sm89" (sm_89 PTX) needs a GPU of compute capability 8.9 or higher; this device is 8.0 (use kernel_build "sm80")`, true},
		{"sm89 on an RTX 3090", BuildSM89, 8, 6, "", "this device is 8.6", true},
		{"sm80 on a T4", BuildSM80, 7, 5, "", "needs a GPU of compute capability 8.0 or higher; this device is 7.5", true},
		{"unknown build", "sm90", 9, 0, "", `unknown kernel build "sm90" (supported: sm80, sm89)`, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ptx, err := selectPTX(tc.build, tc.major, tc.minor)
			if tc.err != "" {
				require.ErrorContains(t, err, tc.err)
				assert.Equal(t, tc.unsupported, errors.Is(err, backend.ErrUnsupported))
				return
			}
			require.NoError(t, err)
			assert.True(t, ptx == tc.want, "selected the wrong PTX")
		})
	}
}

// hardwareE4M3ToF16 models cvt.rn.f16x2.e4m3x2 on one byte (PTX ISA 8.1 on sm_89:
// each e4m3 of the pair becomes an f16, exactly, the low byte the low
// half): the value sign × 2^(e-7) × (1 + m/8), or 2^-6 × m/8 for e = 0,
// written as a binary16. e4m3fn has no infinities; S.1111.111 is NaN, and
// the conversion gives f16's canonical NaN 0x7fff (sign dropped; CUDA's
// cuda_fp8.hpp does the same in its pre-sm_89 fallback).
func hardwareE4M3ToF16(b uint8) uint16 {
	if b&0x7f == 0x7f {
		return 0x7fff
	}
	sign := uint16(b&0x80) << 8
	e, m := int(b>>3)&15, float64(b&7)
	v := math.Ldexp(1+m/8, e-7)
	if e == 0 {
		v = math.Ldexp(m/8, -6)
	}
	if v == 0 {
		return sign
	}
	// Every e4m3 magnitude (2^-9 to 448) is a normal binary16: exponent
	// bias 15, 10 mantissa bits, of which e4m3 uses the top 3.
	fr, ex := math.Frexp(v) // v = fr × 2^ex, fr in [0.5, 1)
	h := uint16(ex-1+15)<<10 | uint16((fr*2-1)*1024)
	return sign | h
}

// hardwareE4M3x2 models the instruction on a pair: low byte to the low half.
func hardwareE4M3x2(pair uint16) uint32 {
	return uint32(hardwareE4M3ToF16(uint8(pair>>8)))<<16 | uint32(hardwareE4M3ToF16(uint8(pair)))
}

// softwareE4M3Bits is cuda/moe_ffn.cu's moe_fp8_to_f32 (the sm_80 build's
// decode, and the sm_89 build's for loads holding a NaN byte), as bits.
func softwareE4M3Bits(b uint8) uint32 {
	sign := uint32(b&0x80) << 24
	e, m := uint32(b>>3)&15, uint32(b&7)
	switch {
	case e == 15 && m == 7:
		return 0x7fc00000 | sign
	case e == 0:
		return math.Float32bits(float32(m)*0.001953125) | sign
	}
	return sign | (e+120)<<23 | m<<20
}

// fp8NaN4 is moe_fp8_nan4: non-zero when one of w's bytes is an e4m3 NaN.
func fp8NaN4(w uint32) uint32 { return ((w & 0x7f7f7f7f) + 0x01010101) & 0x80808080 }

// The sm_89 build's decode (hardware e4m3 → f16, then f16 → f32) gives the
// sm_80 build's f32 bits for every non-NaN byte, and both give exactly the
// value transformers dequantizes (go/dtype's exact decode). NaN bytes never
// reach the hardware path: moe_fp8_nan4 sends their loads to the software
// decode.
func TestHardwareE4M3ModelMatchesTheSoftwareDecode(t *testing.T) {
	nan := 0
	for i := 0; i < 256; i++ {
		b := uint8(i)
		sw := softwareE4M3Bits(b)
		exact := dtype.F8E4M3ToF32(b)
		h := hardwareE4M3ToF16(b)
		if b&0x7f == 0x7f {
			nan++
			assert.True(t, math.IsNaN(float64(math.Float32frombits(sw))), "byte %#02x: software decode", b)
			assert.Equal(t, uint16(0x7fff), h, "byte %#02x: hardware NaN", b)
			continue
		}
		hw := dtype.F16ToF32Bits(h)
		assert.Equal(t, sw, hw, "byte %#02x: f16 %#04x", b, h)
		assert.Equal(t, math.Float32bits(exact), sw, "byte %#02x: exact value %v", b, exact)
		// The f16 really is the value (not only its f32 image): it round-trips.
		assert.Equal(t, h, dtype.F32BitsToF16(hw), "byte %#02x", b)
	}
	assert.Equal(t, 2, nan, "0x7f and 0xff")
}

// The pair form keeps byte order: in the kernel's loop, element k of a
// 16-byte load is byte k&3 of word k>>2 (little-endian), and the pair at k
// (k even) is that word shifted right by 8·(k&3), whose low 16 bits hold
// element k in the low byte and k+1 in the high byte.
func TestHardwareE4M3PairsKeepByteOrder(t *testing.T) {
	for lo := 0; lo < 256; lo++ {
		for hi := 0; hi < 256; hi++ {
			if lo&0x7f == 0x7f || hi&0x7f == 0x7f {
				continue
			}
			r := hardwareE4M3x2(uint16(hi)<<8 | uint16(lo))
			require.Equal(t, softwareE4M3Bits(uint8(lo)), dtype.F16ToF32Bits(uint16(r)), "pair %#02x %#02x: low half", lo, hi)
			require.Equal(t, softwareE4M3Bits(uint8(hi)), dtype.F16ToF32Bits(uint16(r>>16)), "pair %#02x %#02x: high half", lo, hi)
		}
	}
}

// moe_fp8_nan4 flags a 4-byte word exactly when one of its bytes is 0x7f
// or 0xff, whatever the other bytes hold.
func TestFP8NaNDetection(t *testing.T) {
	fill := []uint8{0x00, 0x7e, 0x7f, 0x80, 0xfe, 0xff, 0x3c, 0x01}
	for i := 0; i < 256; i++ {
		for pos := 0; pos < 4; pos++ {
			for _, f := range fill {
				w := uint32(0)
				hasNaN := false
				for k := 0; k < 4; k++ {
					b := f
					if k == pos {
						b = uint8(i)
					}
					w |= uint32(b) << (8 * k)
					hasNaN = hasNaN || b&0x7f == 0x7f
				}
				require.Equal(t, hasNaN, fp8NaN4(w) != 0, "word %#08x", w)
			}
		}
	}
}

// ptxStructParam is the size in bytes of kernel's one by-value struct
// parameter in ptx, or -1 when it takes anything else.
func ptxStructParam(t *testing.T, ptx, kernel string) int {
	t.Helper()
	m := regexp.MustCompile(`(?s)\.visible \.entry ` + kernel + `\(\s*\.param \.align 8 \.b8 ` + kernel + `_param_0\[(\d+)\]\s*\)`).FindStringSubmatch(ptx)
	if m == nil {
		return -1
	}
	n, err := strconv.Atoi(m[1])
	require.NoError(t, err)
	return n
}

// checkLaunchSizes checks that both PTX builds' kernels of l take one
// struct of the size Go passes.
func checkLaunchSizes[G, D kernelParams](t *testing.T, l ffnLaunches[G, D]) {
	t.Helper()
	sizes := [2]int{int(unsafe.Sizeof(l.gateUp)), int(unsafe.Sizeof(l.down))}
	for i, k := range l.kernels {
		for _, ptx := range []string{moeFFNPTX, moeFFNSM89PTX} {
			assert.Equal(t, sizes[i], ptxStructParam(t, ptx, k), "%s takes one struct of the size Go passes", k)
		}
	}
}

func TestSwigluLaunchesFillTheKernelsParameters(t *testing.T) {
	const n = 8
	const tab = 0x1000
	at := func(j int) uint64 { return tab + uint64(8*j*n) }
	base := backend.FFNArgs{X: 1, Out: 2, Scratch: 3, TopK: 4, Weights: 5, T: 3, K: 2, Hidden: 4096, Inter: 1408,
		DType: dtype.F16, WDType: dtype.BF16, Addend: 6}
	gateUp := gateUpParams{X: 1, TopK: 4, GateTab: at(backend.EntryGate), UpTab: at(backend.EntryUp), Scratch: 3,
		P: 6, K: 2, Hidden: 4096, Inter: 1408, DType: 1, E: n}
	down := downParams{Scratch: 3, TopK: 4, DownTab: at(backend.EntryDown), Weights: 5, Out: 2,
		T: 3, K: 2, Hidden: 4096, Inter: 1408, DType: 1, E: n, WDType: 0, Addend: 6}
	fp8 := &backend.FP8Args{BlockRows: 128, BlockCols: 64, UpRow0: 1408}
	tests := []struct {
		name    string
		fp8     *backend.FP8Args
		skip    uint64
		kernels [2]string
		gateUp  func(*gateUpParams)
		down    func(*downParams)
	}{
		{"bfloat16/float16 experts", nil, 0, [2]string{"moe_gate_up_swiglu", "moe_down"}, func(*gateUpParams) {}, func(*downParams) {}},
		{"with a hand-off skip list", nil, 0x9000, [2]string{"moe_gate_up_swiglu", "moe_down"},
			func(p *gateUpParams) { p.Skip = 0x9000 }, func(p *downParams) { p.Skip = 0x9000 }},
		{"FP8 experts: scale grids, no skip list", fp8, 0x9000, [2]string{"moe_gate_up_swiglu_fp8", "moe_down_fp8"},
			func(p *gateUpParams) {
				p.BlockRows, p.BlockCols, p.UpRow0 = 128, 64, 1408
				p.GateScaleTab, p.UpScaleTab = at(backend.EntryGateScale), at(backend.EntryUpScale)
			},
			func(p *downParams) { p.BlockRows, p.BlockCols, p.DownScaleTab = 128, 64, at(backend.EntryDownScale) }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			a := base
			a.FP8 = tc.fp8
			l, err := swigluLaunches(a, tab, n, tc.skip)
			require.NoError(t, err)
			wantGU, wantDown := gateUp, down
			tc.gateUp(&wantGU)
			tc.down(&wantDown)
			assert.Equal(t, tc.kernels, l.kernels)
			assert.Equal(t, [2][2]int{{176, 6}, {512, 3}}, l.grids, "a warp a row, 8 warps a block; a pair, then a token, a grid row")
			assert.Equal(t, wantGU, l.gateUp)
			assert.Equal(t, wantDown, l.down)
			checkLaunchSizes(t, l)
		})
	}
	a := base
	a.WDType = dtype.F64
	_, err := swigluLaunches(a, tab, n, 0)
	assert.ErrorContains(t, err, "routing weights, not F64", "no launch with a type the kernels do not take")
}

func TestGptOssLaunchesFillTheKernelsParameters(t *testing.T) {
	const n = 8
	tests := []struct {
		name    string
		mxfp4   bool
		kernels [2]string
		grids   [2][2]int
	}{
		// T = 3, K = 2, H = 2880, I = 2880 (gpt-oss-120b's sizes).
		{"bfloat16: a lane a column, 32 a block", false, [2]string{"moe_gate_up_gptoss", "moe_down_gptoss"}, [2][2]int{{90, 6}, {90, 3}}},
		{"MXFP4: a warp a row", true, [2]string{"moe_gate_up_gptoss_mxfp4", "moe_down_gptoss_mxfp4"}, [2][2]int{{360, 6}, {360, 3}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			a := backend.FFNArgs{X: 1, Out: 2, Scratch: 3, TopK: 4, Weights: 5, T: 3, K: 2, Hidden: 2880, Inter: 2880, DType: dtype.F16, WDType: dtype.BF16,
				GptOss: &backend.GptOssArgs{Alpha: 1.702, Limit: 7, MXFP4: tc.mxfp4}}
			l, err := gptOssLaunches(a, 0x1000, n)
			require.NoError(t, err)
			assert.Equal(t, tc.kernels, l.kernels)
			assert.Equal(t, tc.grids, l.grids)
			wantGU := gptOssGateUpParams{X: 1, TopK: 4, GateUpTab: 0x1000, BiasTab: 0x1000 + 8*n, Scratch: 3, P: 6, K: 2, Hidden: 2880, Inter: 2880,
				DType: 1, E: n, AlphaBits: int64(math.Float32bits(1.702)), LimitBits: int64(math.Float32bits(7))}
			wantDown := gptOssDownParams{Scratch: 3, TopK: 4, DownTab: 0x1000 + 2*8*n, BiasTab: 0x1000 + 3*8*n, Weights: 5, Out: 2,
				T: 3, K: 2, Hidden: 2880, Inter: 2880, DType: 1, E: n, WDType: 0}
			if tc.mxfp4 {
				wantGU.ScaleTab, wantDown.ScaleTab = 0x1000+4*8*n, 0x1000+5*8*n
			}
			assert.Equal(t, wantGU, l.gateUp)
			assert.Equal(t, wantDown, l.down)
			checkLaunchSizes(t, l)
		})
	}
}

func TestGptOssTableLayout(t *testing.T) {
	for _, mxfp4 := range []bool{false, true} {
		a := backend.FFNArgs{GateUp: []uint64{10, 11}, Down: []uint64{20, 21},
			GptOss: &backend.GptOssArgs{MXFP4: mxfp4, GateUpBias: []uint64{30, 31}, DownBias: []uint64{40, 41}, GateUpScale: []uint64{50, 51}, DownScale: []uint64{60, 61}}}
		tab := make([]uint64, ossEntries*2)
		for i := range tab {
			tab[i] = 99 // stale entries of an earlier call
		}
		gptOssTable(tab, a, 2)
		want := []uint64{10, 11, 30, 31, 20, 21, 40, 41, 0, 0, 0, 0}
		if mxfp4 {
			want = []uint64{10, 11, 30, 31, 20, 21, 40, 41, 50, 51, 60, 61}
		}
		assert.Equal(t, want, tab, "mxfp4 %t", mxfp4)
	}
	assert.Equal(t, backend.MaxEntries, ossEntries, "a gpt-oss expert's entries fit a table row (tableBytes)")
}

// e2m1Model is cuda/moe_ffn.cu's moe_e2m1_to_f32.
func e2m1Model(n uint8) float32 {
	e, m := (n>>1)&3, float32(n&1)
	v := 0.5 * m
	if e != 0 {
		v = (1 + 0.5*m) * float32(uint32(1)<<(e-1))
	}
	if n&8 != 0 {
		return -v
	}
	return v
}

func TestE2M1ModelMatchesTheDequantizer(t *testing.T) {
	for n := range uint8(16) {
		assert.Equal(t, math.Float32bits(dtype.E2M1ToF32(n)), math.Float32bits(e2m1Model(n)), "code %d", n)
	}
}
