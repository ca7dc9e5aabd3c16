package quant

import (
	"testing"

	"github.com/moe-infinity/moe_infinity/go/dtype"
)

// FuzzDequant: shapes and buffers come from checkpoint headers, so any
// combination must give an error or a full output, never a panic.
func FuzzDequant(f *testing.F) {
	f.Add(2, 2, 1, 1, 4, 4, []byte{0x38, 0x38, 0x38, 0x38})
	f.Add(1, 32, 128, 128, 16, 1, []byte{})
	f.Fuzz(func(t *testing.T, rows, cols, br, bc, nW, nS int, data []byte) {
		if rows > 64 || cols > 256 || nW > 1<<14 || nS > 1<<12 || nW < 0 || nS < 0 {
			return
		}
		dst := make([]byte, max(rows*cols, 0)*2)
		w := make([]byte, nW)
		copy(w, data)
		s := make([]byte, nS)
		copy(s, data)
		if err := DequantFP8Block(dst, dtype.BF16, w, s, dtype.F32, rows, cols, Block{br, bc}); err == nil && len(w) != rows*cols {
			t.Fatalf("accepted %d weight bytes for [%d, %d]", len(w), rows, cols)
		}
		if err := DequantMXFP4(dst, dtype.BF16, w, s, rows, cols); err == nil && 2*len(w) != rows*cols {
			t.Fatalf("accepted %d block bytes for [%d, %d]", len(w), rows, cols)
		}
		_ = DequantMXFP4Transposed(dst, dtype.BF16, w, s, rows, cols)
		sr, sc := 0, 0
		if br > 0 && bc > 0 && rows >= 0 && cols >= 0 {
			sr, sc = Block{br, bc}.ScaleGrid(rows, cols)
		}
		if err := QuantFP8Block(dst[:min(len(dst), max(rows*cols, 0))], make([]byte, 4*sr*sc), w, dtype.BF16, rows, cols, Block{br, bc}); err == nil && len(w) != 2*rows*cols {
			t.Fatalf("quantized %d source bytes as [%d, %d] of BF16", len(w), rows, cols)
		}
	})
}
