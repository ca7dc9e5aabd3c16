package dtype

import (
	"errors"
	"strings"
	"testing"
)

// FuzzParse: dtype names arrive through the C ABI (moe_add_host_tensor)
// and the layout spec. Parse never panics; it fails only with an
// *UnknownError quoting the input; what it accepts is a valid dtype that
// its safetensors and PyTorch names parse back to, and it accepts only
// the names it documents: a safetensors name exactly, or a PyTorch alias
// up to case, surrounding whitespace and a "torch." prefix.
func FuzzParse(f *testing.F) {
	for _, s := range []string{"F32", "BF16", "F8_E4M3", "float32", "torch.bfloat16", " Half ", "f32", "", " ", "torch.", "TORCH.FLOAT16", "int8\x00"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		d, err := Parse(s)
		if err != nil {
			var ue *UnknownError
			if !errors.As(err, &ue) || ue.Name != s || d != Invalid {
				t.Fatalf("Parse(%q) = %v, %v", s, d, err)
			}
			return
		}
		if !d.Valid() || d.Size() <= 0 {
			t.Fatalf("Parse(%q) accepted invalid %v", s, d)
		}
		if back, err := ParseSafetensors(d.String()); err != nil || back != d {
			t.Fatalf("%q: safetensors name %q parses to %v, %v", s, d.String(), back, err)
		}
		if back, err := Parse(d.TorchName()); err != nil || back != d {
			t.Fatalf("%q: torch name %q parses to %v, %v", s, d.TorchName(), back, err)
		}
		if st, err := ParseSafetensors(s); err == nil {
			if st != d {
				t.Fatalf("%q: Parse %v, ParseSafetensors %v", s, d, st)
			}
			return
		}
		alias := strings.TrimPrefix(strings.ToLower(strings.TrimSpace(s)), "torch.")
		if a, ok := torchAliases[alias]; !ok || a != d {
			t.Fatalf("Parse(%q) = %v, not a documented name", s, d)
		}
	})
}
