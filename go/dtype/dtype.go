// Package dtype describes tensor element types as they appear in Hugging Face
// safetensors checkpoints and in PyTorch, and converts between the floating
// point types used for expert weights (F32, F16, BF16). It also decodes the
// narrow formats of quantized checkpoints (float8_e4m3fn, float8_e5m2, e2m1
// and e8m0) to float32.
package dtype

import (
	"fmt"
	"strings"
)

// DType is a tensor element type. The zero value is Invalid.
type DType uint8

// The element types known to safetensors. The numeric values are stable
// within this package but are not the safetensors or PyTorch encodings.
const (
	// Invalid is the zero DType; it has size 0 and is rejected by Convert.
	Invalid DType = iota
	// F32 is IEEE 754 binary32 ("F32", torch.float32), 4 bytes.
	F32
	// F16 is IEEE 754 binary16 ("F16", torch.float16), 2 bytes.
	F16
	// BF16 is bfloat16 ("BF16", torch.bfloat16), 2 bytes.
	BF16
	// F64 is IEEE 754 binary64 ("F64", torch.float64), 8 bytes.
	F64
	// I64 is a signed 64-bit integer ("I64", torch.int64), 8 bytes.
	I64
	// I32 is a signed 32-bit integer ("I32", torch.int32), 4 bytes.
	I32
	// I16 is a signed 16-bit integer ("I16", torch.int16), 2 bytes.
	I16
	// I8 is a signed 8-bit integer ("I8", torch.int8), 1 byte.
	I8
	// U8 is an unsigned 8-bit integer ("U8", torch.uint8), 1 byte.
	U8
	// Bool is a boolean stored as one byte ("BOOL", torch.bool), 1 byte.
	Bool
	// F8E4M3 is the 8-bit float with 4 exponent and 3 mantissa bits
	// ("F8_E4M3", torch.float8_e4m3fn), 1 byte.
	F8E4M3
	// F8E5M2 is the 8-bit float with 5 exponent and 2 mantissa bits
	// ("F8_E5M2", torch.float8_e5m2), 1 byte.
	F8E5M2
	// U16 is an unsigned 16-bit integer ("U16", torch.uint16), 2 bytes.
	U16
	// U32 is an unsigned 32-bit integer ("U32", torch.uint32), 4 bytes.
	U32
	// U64 is an unsigned 64-bit integer ("U64", torch.uint64), 8 bytes.
	U64

	numDTypes
)

type info struct {
	st    string // safetensors name
	torch string // canonical torch name (without "torch.")
	size  int    // bytes per element
}

var infos = [numDTypes]info{
	Invalid: {"Invalid", "invalid", 0},
	F32:     {"F32", "float32", 4},
	F16:     {"F16", "float16", 2},
	BF16:    {"BF16", "bfloat16", 2},
	F64:     {"F64", "float64", 8},
	I64:     {"I64", "int64", 8},
	I32:     {"I32", "int32", 4},
	I16:     {"I16", "int16", 2},
	I8:      {"I8", "int8", 1},
	U8:      {"U8", "uint8", 1},
	Bool:    {"BOOL", "bool", 1},
	F8E4M3:  {"F8_E4M3", "float8_e4m3fn", 1},
	F8E5M2:  {"F8_E5M2", "float8_e5m2", 1},
	U16:     {"U16", "uint16", 2},
	U32:     {"U32", "uint32", 4},
	U64:     {"U64", "uint64", 8},
}

// torchAliases maps lower-case PyTorch dtype names (without the "torch."
// prefix) to a DType, including PyTorch's legacy aliases.
var torchAliases = map[string]DType{
	"float32": F32, "float": F32,
	"float16": F16, "half": F16,
	"bfloat16": BF16,
	"float64":  F64, "double": F64,
	"int64": I64, "long": I64,
	"int32": I32, "int": I32,
	"int16": I16, "short": I16,
	"int8":          I8,
	"uint8":         U8,
	"bool":          Bool,
	"float8_e4m3fn": F8E4M3,
	"float8_e5m2":   F8E5M2,
	"uint16":        U16,
	"uint32":        U32,
	"uint64":        U64,
}

// UnknownError is returned by Parse and ParseSafetensors for a name that is
// not a known dtype.
type UnknownError struct {
	// Name is the string that failed to parse.
	Name string
}

// Error implements error.
func (e *UnknownError) Error() string {
	return fmt.Sprintf("dtype: unknown dtype %q (expert weights must be one of F32/float32, F16/float16, BF16/bfloat16)", e.Name)
}

// ParseSafetensors parses a dtype name exactly as it is written in a
// safetensors header ("F32", "BF16", "F8_E4M3", ...). Matching is
// case-sensitive and PyTorch names are not accepted.
func ParseSafetensors(s string) (DType, error) {
	for d := F32; d < numDTypes; d++ {
		if infos[d].st == s {
			return d, nil
		}
	}
	return Invalid, &UnknownError{Name: s}
}

// Parse parses a dtype name. It accepts the safetensors names exactly as
// written in headers ("F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8",
// "U8", "BOOL", "F8_E4M3", "F8_E5M2", "U16", "U32", "U64"; case-sensitive)
// and PyTorch names, case-insensitively and with or without the "torch."
// prefix ("float32", "torch.bfloat16", "half", "Float16", ...). On failure it
// returns an *UnknownError whose message quotes s and lists the float dtypes
// supported for experts.
func Parse(s string) (DType, error) {
	if d, err := ParseSafetensors(s); err == nil {
		return d, nil
	}
	name := strings.ToLower(strings.TrimSpace(s))
	name = strings.TrimPrefix(name, "torch.")
	if d, ok := torchAliases[name]; ok {
		return d, nil
	}
	return Invalid, &UnknownError{Name: s}
}

// Size returns the size of one element in bytes (0 for Invalid or an
// out-of-range value).
func (d DType) Size() int {
	if d >= numDTypes {
		return 0
	}
	return infos[d].size
}

// String returns the safetensors name of d, e.g. "BF16". Out-of-range
// values are formatted as "DType(n)".
func (d DType) String() string {
	if d >= numDTypes {
		return fmt.Sprintf("DType(%d)", uint8(d))
	}
	return infos[d].st
}

// TorchName returns the canonical PyTorch name of d without the "torch."
// prefix, e.g. "bfloat16". Out-of-range values give "DType(n)".
func (d DType) TorchName() string {
	if d >= numDTypes {
		return fmt.Sprintf("DType(%d)", uint8(d))
	}
	return infos[d].torch
}

// IsFloat reports whether d is one of the expert/compute dtypes F32, F16 or
// BF16 (the dtypes Convert handles). F64 and the 8-bit floats are not
// included.
func (d DType) IsFloat() bool {
	return d == F32 || d == F16 || d == BF16
}

// Valid reports whether d is a known dtype other than Invalid.
func (d DType) Valid() bool {
	return d > Invalid && d < numDTypes
}
