package store

import (
	"encoding/binary"
	"errors"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/dtype"
)

// stBytes builds a safetensors file from a raw JSON header and dataLen bytes
// of data (byte i of the data section is byte(i)).
func stBytes(header string, dataLen int) []byte {
	b := make([]byte, 8, 8+len(header)+dataLen)
	binary.LittleEndian.PutUint64(b, uint64(len(header)))
	b = append(b, header...)
	for i := 0; i < dataLen; i++ {
		b = append(b, byte(i))
	}
	return b
}

func TestParseHeaderValid(t *testing.T) {
	tests := []struct {
		name     string
		header   string
		dataLen  int
		want     []TensorInfo
		metadata map[string]string
	}{
		{
			name:    "two tensors, metadata, out of order",
			header:  `{"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]},"__metadata__":{"format":"pt"},"a":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}`,
			dataLen: 12,
			want: []TensorInfo{
				{Name: "a", DType: dtype.BF16, Shape: []int64{2}, Begin: 0, End: 4},
				{Name: "b", DType: dtype.F32, Shape: []int64{2}, Begin: 4, End: 12},
			},
			metadata: map[string]string{"format": "pt"},
		},
		{
			name:    "empty header object, padding spaces",
			header:  `{}      `,
			dataLen: 0,
			want:    []TensorInfo{},
		},
		{
			name:    "scalar, zero-size tensors, gaps, unknown fields, null metadata",
			header:  `{"__metadata__":null,"s":{"dtype":"I64","shape":[],"data_offsets":[8,16],"extra":{"x":[1,2]}},"z":{"dtype":"U8","shape":[0,5],"data_offsets":[10,10]},"y":{"dtype":"BOOL","shape":[0],"data_offsets":[0,0]},"w":{"dtype":"F8_E4M3","shape":[3],"data_offsets":[20,23]}}`,
			dataLen: 30,
			want: []TensorInfo{
				{Name: "y", DType: dtype.Bool, Shape: []int64{0}, Begin: 0, End: 0},
				{Name: "s", DType: dtype.I64, Shape: []int64{}, Begin: 8, End: 16},
				{Name: "z", DType: dtype.U8, Shape: []int64{0, 5}, Begin: 10, End: 10},
				{Name: "w", DType: dtype.F8E4M3, Shape: []int64{3}, Begin: 20, End: 23},
			},
		},
		{
			name:    "escaped names and whitespace",
			header:  " {\n \"a\\u002eb\" : { \"shape\" : [ 1 , 2 ] , \"dtype\" : \"F16\" , \"data_offsets\" : [ 0 , 4 ] } } ",
			dataLen: 4,
			want:    []TensorInfo{{Name: "a.b", DType: dtype.F16, Shape: []int64{1, 2}, Begin: 0, End: 4}},
		},
		{
			name:    "huge zero-size shape does not overflow",
			header:  `{"a":{"dtype":"F64","shape":[9223372036854775807,9223372036854775807,0],"data_offsets":[0,0]}}`,
			dataLen: 0,
			want:    []TensorInfo{{Name: "a", DType: dtype.F64, Shape: []int64{9223372036854775807, 9223372036854775807, 0}}},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b := stBytes(tc.header, tc.dataLen)
			h, err := ParseHeader(b, int64(len(b)))
			require.NoError(t, err)
			assert.Equal(t, tc.want, h.Tensors)
			assert.Equal(t, tc.metadata, h.Metadata)
			assert.Equal(t, int64(8+len(tc.header)), h.DataStart)
			for _, ti := range h.Tensors {
				assert.Equal(t, ti.End-ti.Begin, ti.NumBytes())
			}
		})
	}
}

func TestParseHeaderErrors(t *testing.T) {
	tensor := func(body string) string { return `{"t":` + body + `}` }
	tests := []struct {
		name    string
		buf     []byte // if nil, stBytes(header, dataLen)
		header  string
		dataLen int
		size    int64 // if 0, len(buf)
		want    string
		tensor  string
	}{
		{name: "short buffer", buf: []byte{1, 2, 3}, size: 3, want: "need at least 8 bytes"},
		{name: "small file", buf: make([]byte, 8), size: 7, want: "file is 7 bytes, too small"},
		{name: "huge N", buf: []byte{0, 0, 0, 0, 0, 0, 0, 1}, want: "exceeds the limit"},
		{name: "N past end", buf: []byte{100, 0, 0, 0, 0, 0, 0, 0, '{', '}'}, want: "header length 100 bytes runs past the end of the 10-byte file"},
		{name: "buffer shorter than header", buf: stBytes(`{}`, 0)[:9], size: 10, want: "buffer holds 9 bytes but the header needs 10"},
		{name: "not UTF-8", header: "{\"\xff\":1}", want: "not valid UTF-8"},
		{name: "empty JSON", header: "", want: "header JSON: unexpected end of JSON input"},
		{name: "malformed JSON", header: `{"a": `, want: "header JSON"},
		{name: "bad JSON syntax", header: `{"a" 1}`, want: "header JSON: expected colon after object key"},
		{name: "not an object", header: `[1,2]`, want: `expected a JSON object, found "["`},
		{name: "string at top", header: `"x"`, want: `expected a JSON object, found string "x"`},
		{name: "trailing data", header: `{} {}`, want: "unexpected data after the object"},
		{name: "trailing junk", header: `{} x`, want: "header JSON: invalid character"},
		{name: "duplicate key", header: `{"a":{},"a":{}}`, want: `duplicate key "a"`},
		{name: "duplicate escaped key", header: `{"__metadata__":{},"\u005f_metadata__":{}}`, want: `duplicate key "__metadata__"`},
		{name: "metadata not object", header: `{"__metadata__":[1]}`, want: "must be an object of string values", tensor: metadataKey},
		{name: "metadata non-string", header: `{"__metadata__":{"a":1}}`, want: `value of "a" must be a string: expected a string, found "1"`, tensor: metadataKey},
		{name: "metadata duplicate", header: `{"__metadata__":{"a":"1","a":"2"}}`, want: `duplicate key "a"`, tensor: metadataKey},
		{name: "entry not object", header: tensor(`5`), want: "entry must be an object", tensor: "t"},
		{name: "entry null", header: tensor(`null`), want: "entry must be an object", tensor: "t"},
		{name: "missing dtype", header: tensor(`{"shape":[1],"data_offsets":[0,1]}`), dataLen: 1, want: `missing "dtype"`, tensor: "t"},
		{name: "missing shape", header: tensor(`{"dtype":"U8","data_offsets":[0,1]}`), dataLen: 1, want: `missing "shape"`, tensor: "t"},
		{name: "missing offsets", header: tensor(`{"dtype":"U8","shape":[1]}`), dataLen: 1, want: `missing "data_offsets"`, tensor: "t"},
		{name: "dtype not string", header: tensor(`{"dtype":4,"shape":[1],"data_offsets":[0,1]}`), dataLen: 1, want: "dtype: expected a string", tensor: "t"},
		{name: "dtype null", header: tensor(`{"dtype":null,"shape":[1],"data_offsets":[0,1]}`), dataLen: 1, want: "dtype: expected a string", tensor: "t"},
		{name: "unknown dtype", header: tensor(`{"dtype":"F7","shape":[1],"data_offsets":[0,1]}`), dataLen: 1, want: `unknown dtype "F7"`, tensor: "t"},
		{name: "torch dtype name", header: tensor(`{"dtype":"float32","shape":[1],"data_offsets":[0,4]}`), dataLen: 4, want: `unknown dtype "float32"`, tensor: "t"},
		{name: "shape not array", header: tensor(`{"dtype":"U8","shape":"1","data_offsets":[0,1]}`), dataLen: 1, want: "shape: expected an array", tensor: "t"},
		{name: "shape null", header: tensor(`{"dtype":"U8","shape":null,"data_offsets":[0,1]}`), dataLen: 1, want: "shape: expected an array", tensor: "t"},
		{name: "shape negative", header: tensor(`{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}`), dataLen: 1, want: `element 0 is "-1", not a non-negative integer`, tensor: "t"},
		{name: "shape float", header: tensor(`{"dtype":"U8","shape":[1.0],"data_offsets":[0,1]}`), dataLen: 1, want: "not a non-negative integer", tensor: "t"},
		{name: "shape exponent", header: tensor(`{"dtype":"U8","shape":[1e0],"data_offsets":[0,1]}`), dataLen: 1, want: "not a non-negative integer", tensor: "t"},
		{name: "shape string elem", header: tensor(`{"dtype":"U8","shape":["1"],"data_offsets":[0,1]}`), dataLen: 1, want: "not a non-negative integer", tensor: "t"},
		{name: "shape too large", header: tensor(`{"dtype":"U8","shape":[9223372036854775808],"data_offsets":[0,1]}`), dataLen: 1, want: "is too large", tensor: "t"},
		{name: "shape bad JSON", header: tensor(`{"dtype":"U8","shape":[1,],"data_offsets":[0,1]}`), dataLen: 1, want: "invalid character"},
		{name: "shape overflow", header: tensor(`{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,1]}`), dataLen: 1, want: "overflows int64 bytes", tensor: "t"},
		{name: "shape overflow by size", header: tensor(`{"dtype":"F64","shape":[2305843009213693952],"data_offsets":[0,1]}`), dataLen: 1, want: "overflows int64 bytes", tensor: "t"},
		{name: "offsets count", header: tensor(`{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}`), dataLen: 2, want: "data_offsets must be [begin, end], got 3 values", tensor: "t"},
		{name: "offsets negative", header: tensor(`{"dtype":"U8","shape":[1],"data_offsets":[-1,0]}`), dataLen: 1, want: "data_offsets: element 0", tensor: "t"},
		{name: "offsets reversed", header: tensor(`{"dtype":"U8","shape":[5],"data_offsets":[10,5]}`), dataLen: 10, want: "data_offsets [10, 5] end before begin", tensor: "t"},
		{name: "offsets size mismatch", header: tensor(`{"dtype":"F32","shape":[2],"data_offsets":[0,4]}`), dataLen: 8, want: "data_offsets [0, 4] span 4 bytes but shape [2] of F32 needs 8", tensor: "t"},
		{name: "offsets past end", header: tensor(`{"dtype":"F32","shape":[16],"data_offsets":[0,64]}`), dataLen: 32, want: "data_offsets [0, 64] run past the end of the data section (32 bytes", tensor: "t"},
		{name: "offsets huge", header: tensor(`{"dtype":"U8","shape":[1],"data_offsets":[9223372036854775806,9223372036854775807]}`), dataLen: 1, want: "run past the end", tensor: "t"},
		{
			name:    "overlap",
			header:  `{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}`,
			dataLen: 12, want: `data_offsets [4, 12] overlap tensor "a" at [0, 8]`, tensor: "b",
		},
		{
			name:    "identical ranges",
			header:  `{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"I8","shape":[4],"data_offsets":[0,4]}}`,
			dataLen: 4, want: `overlap tensor "a"`, tensor: "b",
		},
		{
			name:    "contained",
			header:  `{"a":{"dtype":"U8","shape":[10],"data_offsets":[0,10]},"z":{"dtype":"U8","shape":[0],"data_offsets":[5,5]},"b":{"dtype":"U8","shape":[2],"data_offsets":[6,8]}}`,
			dataLen: 10, want: `overlap tensor "a"`, tensor: "b",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			buf := tc.buf
			if buf == nil {
				buf = stBytes(tc.header, tc.dataLen)
			}
			size := tc.size
			if size == 0 {
				size = int64(len(buf))
			}
			h, err := ParseHeader(buf, size)
			require.ErrorContains(t, err, tc.want)
			assert.Nil(t, h)
			var fe *FormatError
			require.True(t, errors.As(err, &fe), "want *FormatError, got %T", err)
			assert.Equal(t, tc.tensor, fe.Tensor)
			assert.Empty(t, fe.File)
			assert.True(t, strings.HasPrefix(err.Error(), "store: "))
		})
	}
}

func TestFormatErrorString(t *testing.T) {
	tests := []struct {
		err  *FormatError
		want string
	}{
		{&FormatError{File: "model-00002.safetensors", Tensor: "x", Msg: "data_offsets [10, 5] end before begin"},
			`store: model-00002.safetensors: tensor "x": data_offsets [10, 5] end before begin`},
		{&FormatError{File: "f", Msg: "m"}, "store: f: m"},
		{&FormatError{Tensor: "t", Msg: "m"}, `store: tensor "t": m`},
		{&FormatError{Msg: "m"}, "store: m"},
	}
	for _, tc := range tests {
		assert.Equal(t, tc.want, tc.err.Error())
		assert.Nil(t, tc.err.Unwrap())
	}
	e := &FormatError{Msg: "x", err: ErrDuplicate}
	assert.ErrorIs(t, e, ErrDuplicate)
}

func TestParseIndex(t *testing.T) {
	tests := []struct {
		name      string
		in        string
		weightMap map[string]string
		metadata  map[string]any
		want      string // error substring; "" for success
		tensor    string
	}{
		{name: "valid", in: `{"metadata":{"total_size":12,"x":[1]},"weight_map":{"a":"model-00001-of-00002.safetensors","b":"sub/model-00002-of-00002.safetensors"}}`,
			weightMap: map[string]string{"a": "model-00001-of-00002.safetensors", "b": "sub/model-00002-of-00002.safetensors"},
			metadata:  map[string]any{"total_size": float64(12), "x": []any{float64(1)}}},
		{name: "no metadata, extra keys", in: `{"weight_map":{},"other":5}`, weightMap: map[string]string{}},
		{name: "null metadata", in: `{"metadata":null,"weight_map":{"a":"a.safetensors"}}`, weightMap: map[string]string{"a": "a.safetensors"}},
		{name: "not UTF-8", in: "{\"weight_map\":{\"\xfe\":\"a.safetensors\"}}", want: "not valid UTF-8"},
		{name: "not JSON", in: `weight_map`, want: "index JSON: invalid character"},
		{name: "empty", in: ``, want: "index JSON: unexpected end of JSON input"},
		{name: "array", in: `[]`, want: "expected a JSON object"},
		{name: "trailing", in: `{"weight_map":{}}]`, want: "index JSON"},
		{name: "missing weight_map", in: `{"metadata":{}}`, want: `index has no "weight_map"`},
		{name: "weight_map null", in: `{"weight_map":null}`, want: "weight_map must be an object"},
		{name: "weight_map array", in: `{"weight_map":["a.safetensors"]}`, want: "weight_map must be an object"},
		{name: "duplicate weight_map", in: `{"weight_map":{},"weight_map":{}}`, want: `duplicate key "weight_map"`},
		{name: "duplicate tensor", in: `{"weight_map":{"a":"x.safetensors","a":"y.safetensors"}}`, want: `duplicate key "a"`},
		{name: "value not string", in: `{"weight_map":{"a":1}}`, want: "weight_map value: expected a string", tensor: "a"},
		{name: "metadata not object", in: `{"metadata":"x","weight_map":{}}`, want: "index metadata must be an object"},
		{name: "absolute", in: `{"weight_map":{"a":"/abs/x.safetensors"}}`, want: `weight_map shard "/abs/x.safetensors" is an absolute path`, tensor: "a"},
		{name: "dotdot", in: `{"weight_map":{"a":"../x.safetensors"}}`, want: `weight_map shard "../x.safetensors" contains ".."`, tensor: "a"},
		{name: "dotdot inside", in: `{"weight_map":{"a":"sub/../../x.safetensors"}}`, want: `contains ".."`, tensor: "a"},
		{name: "unclean", in: `{"weight_map":{"a":"./x.safetensors"}}`, want: "is not a clean relative path", tensor: "a"},
		{name: "double slash", in: `{"weight_map":{"a":"sub//x.safetensors"}}`, want: "is not a clean relative path", tensor: "a"},
		{name: "empty shard", in: `{"weight_map":{"a":""}}`, want: "is empty", tensor: "a"},
		{name: "NUL", in: `{"weight_map":{"a":"x\u0000.safetensors"}}`, want: "contains a NUL byte", tensor: "a"},
		{name: "wrong extension", in: `{"weight_map":{"a":"pytorch_model.bin"}}`, want: `does not end in ".safetensors"`, tensor: "a"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			idx, err := ParseIndex([]byte(tc.in))
			if tc.want != "" {
				require.ErrorContains(t, err, tc.want)
				assert.Nil(t, idx)
				var fe *FormatError
				require.True(t, errors.As(err, &fe))
				assert.Equal(t, tc.tensor, fe.Tensor)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.weightMap, idx.WeightMap)
			assert.Equal(t, tc.metadata, idx.Metadata)
		})
	}
}

func TestIndexHelpers(t *testing.T) {
	idx := &Index{WeightMap: map[string]string{"b": "s2.safetensors", "a": "s1.safetensors", "c": "s1.safetensors"}}
	assert.Equal(t, []string{"s1.safetensors", "s2.safetensors"}, idx.Shards())
	assert.Equal(t, []string{"a", "c"}, idx.TensorsIn("s1.safetensors"))
	assert.Empty(t, idx.TensorsIn("nope.safetensors"))
}
