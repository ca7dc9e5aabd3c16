package store

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"math/bits"
	"sort"
	"strconv"
	"unicode/utf8"

	"github.com/moe-infinity/moe_infinity/go/dtype"
)

// MaxHeaderSize is the largest safetensors JSON header accepted, in bytes
// (100 MiB, the limit the reference implementation uses).
const MaxHeaderSize = 100 << 20

// metadataKey is the reserved header key holding free-form string metadata.
const metadataKey = "__metadata__"

// TensorInfo describes one entry of a safetensors header.
type TensorInfo struct {
	// Name is the tensor name (the header key).
	Name string
	// DType is the element type.
	DType dtype.DType
	// Shape holds the dimensions in elements; empty for a scalar.
	Shape []int64
	// Begin and End are byte offsets relative to the start of the data
	// section (Header.DataStart); End-Begin is the tensor size in bytes.
	Begin, End int64
}

// NumBytes returns the size of the tensor's data in bytes.
func (t TensorInfo) NumBytes() int64 { return t.End - t.Begin }

// Header is a parsed, validated safetensors header.
type Header struct {
	// Tensors lists every tensor, sorted by Begin (ties by End, then Name).
	Tensors []TensorInfo
	// Metadata is the optional "__metadata__" map; nil when absent.
	Metadata map[string]string
	// DataStart is the file offset of the data section in bytes
	// (8 + header length).
	DataStart int64
}

// ParseHeader parses the safetensors header at the start of a file. buf must
// hold at least the first 8+N bytes of the file, where N is the little-endian
// uint64 in the first 8 bytes; fileSize is the full file size in bytes.
//
// It validates that N <= MaxHeaderSize and 8+N <= fileSize; that the header
// is valid UTF-8 JSON holding one object with no duplicate keys; that the
// optional "__metadata__" entry maps strings to strings; and that every other
// entry has a known safetensors "dtype", a "shape" of non-negative integers
// and "data_offsets" [begin, end] with begin <= end, end-begin equal to the
// element count times the dtype size (computed without overflow) and
// DataStart+end <= fileSize. Tensors must not overlap (empty tensors overlap
// nothing); gaps between tensors are allowed. Unknown fields inside a tensor
// entry are ignored.
//
// Errors are *FormatError values naming the tensor where there is one; File
// is left empty for the caller to fill in.
func ParseHeader(buf []byte, fileSize int64) (*Header, error) {
	if len(buf) < 8 {
		return nil, formatErr("", "need at least 8 bytes to read the header length, have %d", len(buf))
	}
	if fileSize < 8 {
		return nil, formatErr("", "file is %d bytes, too small for a safetensors header (at least 8)", fileSize)
	}
	n := binary.LittleEndian.Uint64(buf)
	if n > MaxHeaderSize {
		return nil, formatErr("", "header length %d bytes exceeds the limit of %d bytes (not a safetensors file?)", n, MaxHeaderSize)
	}
	if 8+n > uint64(fileSize) {
		return nil, formatErr("", "header length %d bytes runs past the end of the %d-byte file (truncated?)", n, fileSize)
	}
	if uint64(len(buf)) < 8+n {
		return nil, formatErr("", "buffer holds %d bytes but the header needs %d", len(buf), 8+n)
	}
	js := buf[8 : 8+n]
	if !utf8.Valid(js) {
		return nil, formatErr("", "header is not valid UTF-8")
	}
	members, err := readObject(js)
	if err != nil {
		return nil, formatErr("", "header JSON: %v", err)
	}
	h := &Header{DataStart: int64(8 + n)}
	dataSize := fileSize - h.DataStart
	h.Tensors = make([]TensorInfo, 0, len(members))
	for _, m := range members {
		if m.key == metadataKey {
			md, err := parseMetadata(m.val)
			if err != nil {
				return nil, err
			}
			h.Metadata = md
			continue
		}
		ti, err := parseTensorEntry(m.key, m.val, dataSize)
		if err != nil {
			return nil, err
		}
		h.Tensors = append(h.Tensors, ti)
	}
	sort.Slice(h.Tensors, func(i, j int) bool {
		a, b := &h.Tensors[i], &h.Tensors[j]
		if a.Begin != b.Begin {
			return a.Begin < b.Begin
		}
		if a.End != b.End {
			return a.End < b.End
		}
		return a.Name < b.Name
	})
	prev := -1 // index of the previous non-empty tensor
	for i := range h.Tensors {
		t := &h.Tensors[i]
		if t.Begin == t.End {
			continue
		}
		if prev >= 0 && t.Begin < h.Tensors[prev].End {
			p := &h.Tensors[prev]
			return nil, formatErr(t.Name, "data_offsets [%d, %d] overlap tensor %q at [%d, %d]", t.Begin, t.End, p.Name, p.Begin, p.End)
		}
		prev = i
	}
	return h, nil
}

func parseMetadata(raw json.RawMessage) (map[string]string, error) {
	if isNull(raw) {
		return nil, nil
	}
	members, err := readObject(raw)
	if err != nil {
		return nil, formatErr(metadataKey, "must be an object of string values: %v", err)
	}
	md := make(map[string]string, len(members))
	for _, m := range members {
		s, err := decodeString(m.val)
		if err != nil {
			return nil, formatErr(metadataKey, "value of %q must be a string: %v", m.key, err)
		}
		md[m.key] = s
	}
	return md, nil
}

func parseTensorEntry(name string, raw json.RawMessage, dataSize int64) (TensorInfo, error) {
	ti := TensorInfo{Name: name}
	members, err := readObject(raw)
	if err != nil {
		return ti, formatErr(name, "entry must be an object with dtype, shape and data_offsets: %v", err)
	}
	var dtRaw, shapeRaw, offRaw json.RawMessage
	for _, m := range members {
		switch m.key {
		case "dtype":
			dtRaw = m.val
		case "shape":
			shapeRaw = m.val
		case "data_offsets":
			offRaw = m.val
		}
	}
	switch {
	case dtRaw == nil:
		return ti, formatErr(name, `missing "dtype"`)
	case shapeRaw == nil:
		return ti, formatErr(name, `missing "shape"`)
	case offRaw == nil:
		return ti, formatErr(name, `missing "data_offsets"`)
	}
	dts, err := decodeString(dtRaw)
	if err != nil {
		return ti, formatErr(name, "dtype: %v", err)
	}
	if ti.DType, err = dtype.ParseSafetensors(dts); err != nil {
		return ti, formatErr(name, "unknown dtype %q", dts)
	}
	shape, err := decodeUints(shapeRaw)
	if err != nil {
		return ti, formatErr(name, "shape: %v", err)
	}
	ti.Shape = make([]int64, len(shape))
	for i, d := range shape {
		ti.Shape[i] = int64(d)
	}
	offs, err := decodeUints(offRaw)
	if err != nil {
		return ti, formatErr(name, "data_offsets: %v", err)
	}
	if len(offs) != 2 {
		return ti, formatErr(name, "data_offsets must be [begin, end], got %d values", len(offs))
	}
	begin, end := offs[0], offs[1]
	if begin > end {
		return ti, formatErr(name, "data_offsets [%d, %d] end before begin", begin, end)
	}
	want, ok := byteSize(ti.Shape, ti.DType)
	if !ok {
		return ti, formatErr(name, "shape %v of %s overflows int64 bytes", ti.Shape, ti.DType)
	}
	if end-begin != uint64(want) {
		return ti, formatErr(name, "data_offsets [%d, %d] span %d bytes but shape %v of %s needs %d", begin, end, end-begin, ti.Shape, ti.DType, want)
	}
	if end > uint64(dataSize) {
		return ti, formatErr(name, "data_offsets [%d, %d] run past the end of the data section (%d bytes; file truncated?)", begin, end, dataSize)
	}
	ti.Begin, ti.End = int64(begin), int64(end)
	return ti, nil
}

// byteSize returns product(shape)*dt.Size() and whether it fits in an
// int64. Dimensions must be non-negative.
func byteSize(shape []int64, dt dtype.DType) (int64, bool) {
	for _, d := range shape {
		if d == 0 {
			return 0, true
		}
	}
	n := uint64(dt.Size())
	for _, d := range shape {
		if d < 0 {
			return 0, false
		}
		hi, lo := bits.Mul64(n, uint64(d))
		if hi != 0 || lo > math.MaxInt64 {
			return 0, false
		}
		n = lo
	}
	return int64(n), true
}

// member is one key/value pair of a JSON object, in document order.
type member struct {
	key string
	val json.RawMessage
}

// readObject decodes raw as exactly one JSON object (surrounding whitespace
// allowed) and returns its members in order. Duplicate keys are an error.
func readObject(raw []byte) ([]member, error) {
	dec := json.NewDecoder(bytes.NewReader(raw))
	tok, err := dec.Token()
	if err != nil {
		return nil, jsonErr(err)
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return nil, fmt.Errorf("expected a JSON object, found %s", describeToken(tok))
	}
	var members []member
	seen := make(map[string]struct{})
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, jsonErr(err)
		}
		key, ok := tok.(string)
		if !ok { // unreachable: the decoder only yields string keys
			return nil, fmt.Errorf("expected an object key, found %s", describeToken(tok))
		}
		if _, dup := seen[key]; dup {
			return nil, fmt.Errorf("duplicate key %q", key)
		}
		seen[key] = struct{}{}
		var val json.RawMessage
		if err := dec.Decode(&val); err != nil {
			return nil, jsonErr(err)
		}
		members = append(members, member{key, val})
	}
	if _, err := dec.Token(); err != nil { // the closing '}'
		return nil, jsonErr(err)
	}
	if tok, err := dec.Token(); err != io.EOF {
		if err != nil {
			return nil, jsonErr(err)
		}
		return nil, fmt.Errorf("unexpected data after the object: %s", describeToken(tok))
	}
	return members, nil
}

func jsonErr(err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return errors.New("unexpected end of JSON input")
	}
	return err
}

func describeToken(tok json.Token) string {
	switch v := tok.(type) {
	case json.Delim:
		return fmt.Sprintf("%q", string(v))
	case string:
		return fmt.Sprintf("string %q", v)
	case nil:
		return "null"
	default:
		return fmt.Sprintf("%T %v", v, v)
	}
}

func isNull(raw []byte) bool {
	return string(bytes.TrimSpace(raw)) == "null"
}

// decodeString decodes raw, which must be a JSON string (not null).
func decodeString(raw []byte) (string, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || raw[0] != '"' {
		return "", fmt.Errorf("expected a string, found %s", clip(raw))
	}
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		return "", err
	}
	return s, nil
}

// decodeUints decodes raw, which must be a JSON array of non-negative
// integers that fit in an int64 (no fractions, exponents or signs).
func decodeUints(raw []byte) ([]uint64, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || raw[0] != '[' {
		return nil, fmt.Errorf("expected an array of non-negative integers, found %s", clip(raw))
	}
	var elems []json.RawMessage
	if err := json.Unmarshal(raw, &elems); err != nil {
		return nil, err
	}
	out := make([]uint64, len(elems))
	for i, e := range elems {
		s := string(bytes.TrimSpace(e))
		if s == "" || !allDigits(s) {
			return nil, fmt.Errorf("element %d is %s, not a non-negative integer", i, clip(e))
		}
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil || v > math.MaxInt64 {
			return nil, fmt.Errorf("element %d (%s) is too large", i, s)
		}
		out[i] = v
	}
	return out, nil
}

func allDigits(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// clip returns raw JSON shortened for an error message.
func clip(raw []byte) string {
	const max = 40
	if len(raw) == 0 {
		return "nothing"
	}
	if len(raw) > max {
		return strconv.Quote(string(raw[:max])) + "..."
	}
	return strconv.Quote(string(raw))
}
