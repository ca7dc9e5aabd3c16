package requant

import (
	"testing"

	"github.com/moe-infinity/moe_infinity/go/dtype"
	"github.com/moe-infinity/moe_infinity/go/quant"
)

// BenchmarkQuantFP8BlockQwen3Expert quantizes one Qwen3-30B-A3B expert
// matrix (768 × 2048 bf16) on one core; b.SetBytes counts source bytes, so
// the MB/s it prints sizes expert_dtype="fp8"'s compression time.
func BenchmarkQuantFP8BlockQwen3Expert(b *testing.B) {
	const rows, cols = 768, 2048
	src := bf16s([]int64{rows, cols}, wave(1)).data
	q, s := make([]byte, rows*cols), make([]byte, 4*6*16)
	b.SetBytes(int64(len(src)))
	for i := 0; i < b.N; i++ {
		if err := quant.QuantFP8Block(q, s, src, dtype.BF16, rows, cols, DefaultBlock); err != nil {
			b.Fatal(err)
		}
	}
}
