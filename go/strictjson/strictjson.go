// Package strictjson decodes JSON settings that come from outside the
// engine (the C ABI, files) so that a mistake is an error, never a silently
// ignored or silently different setting.
//
// encoding/json alone reads one value and ignores what follows it, matches
// object keys to struct fields case-insensitively, and lets the last of
// several equal keys win. Decode rejects all three.
package strictjson

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"reflect"
	"sort"
	"strings"
)

// Decode decodes b into v, a pointer to a struct. b must hold exactly one
// JSON object, with only whitespace around it. Every key, at every depth
// where the Go type is a struct, must be the exact json name of a field
// (`json:"name"` tag, else the field name): unknown keys and keys that
// match a field only up to case are errors. No object may repeat a key.
// The keys of a type that implements json.Unmarshaler are checked only
// for duplicates.
func Decode(b []byte, v any) error {
	t := reflect.TypeOf(v)
	if t == nil || t.Kind() != reflect.Pointer || t.Elem().Kind() != reflect.Struct {
		return fmt.Errorf("strictjson: Decode needs a pointer to a struct, got %T", v)
	}
	if trimmed := bytes.TrimLeft(b, " \t\r\n"); len(trimmed) == 0 || trimmed[0] != '{' {
		return fmt.Errorf("expected a JSON object, found %s", clip(trimmed))
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		if strings.HasPrefix(err.Error(), "json: unknown field") {
			// b is valid JSON up to the key: the walk names the key, where
			// it is, and the keys that are valid there.
			if kerr := checkKeys(json.NewDecoder(bytes.NewReader(b)), t.Elem(), ""); kerr != nil {
				return kerr
			}
		}
		return eofErr(err)
	}
	if off := dec.InputOffset(); hasData(dec) {
		return fmt.Errorf("unexpected data after the JSON object at byte %d: %s", off, clip(bytes.TrimLeft(b[off:], " \t\r\n")))
	}
	// The value decoded, so b is valid JSON: the walk below only checks names.
	keys := json.NewDecoder(bytes.NewReader(b))
	return checkKeys(keys, t.Elem(), "")
}

// hasData reports whether anything but whitespace follows the decoder's
// first value.
func hasData(dec *json.Decoder) bool {
	_, err := dec.Token()
	return !errors.Is(err, io.EOF)
}

// checkKeys reads one value from dec and checks its object keys against
// t (nil: any key, but still no duplicates). path names the value in
// errors ("" is the top level).
func checkKeys(dec *json.Decoder, t reflect.Type, path string) error {
	for t != nil && t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	tok, err := dec.Token()
	if err != nil {
		return eofErr(err)
	}
	switch tok {
	case json.Delim('{'):
		var fields map[string]reflect.Type
		var elem reflect.Type
		switch {
		case t != nil && t.Kind() == reflect.Struct && !isUnmarshaler(t):
			fields = fieldTypes(t)
		case t != nil && t.Kind() == reflect.Map:
			elem = t.Elem()
		}
		seen := make(map[string]bool)
		for dec.More() {
			tok, err := dec.Token()
			if err != nil {
				return eofErr(err)
			}
			key, _ := tok.(string) // the decoder yields only string keys
			if seen[key] {
				return fmt.Errorf("duplicate key %q%s", key, in(path))
			}
			seen[key] = true
			valType := elem
			if fields != nil {
				ft, ok := fields[key]
				if !ok {
					return unknownKey(key, fields, path)
				}
				valType = ft
			}
			if err := checkKeys(dec, valType, join(path, key)); err != nil {
				return err
			}
		}
	case json.Delim('['):
		var elem reflect.Type
		if t != nil && (t.Kind() == reflect.Slice || t.Kind() == reflect.Array) {
			elem = t.Elem()
		}
		for i := 0; dec.More(); i++ {
			if err := checkKeys(dec, elem, fmt.Sprintf("%s[%d]", path, i)); err != nil {
				return err
			}
		}
	default:
		return nil // a scalar
	}
	_, err = dec.Token() // the closing delimiter
	return eofErr(err)
}

var unmarshalerType = reflect.TypeFor[json.Unmarshaler]()

func isUnmarshaler(t reflect.Type) bool {
	return t.Implements(unmarshalerType) || reflect.PointerTo(t).Implements(unmarshalerType)
}

// fieldTypes maps the json name of each exported field of struct type t
// to its type.
func fieldTypes(t reflect.Type) map[string]reflect.Type {
	fields := make(map[string]reflect.Type, t.NumField())
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		ft := f.Type
		if ft.Kind() == reflect.Pointer {
			ft = ft.Elem()
		}
		if f.Anonymous && name == "" && ft.Kind() == reflect.Struct {
			for n, typ := range fieldTypes(ft) { // promoted; the outer struct's own fields win
				if _, ok := fields[n]; !ok {
					fields[n] = typ
				}
			}
			continue
		}
		if !f.IsExported() {
			continue
		}
		switch name {
		case "-":
			continue
		case "":
			name = f.Name
		}
		fields[name] = f.Type
	}
	return fields
}

// unknownKey explains a key that names no field (encoding/json has let
// through only keys that match one up to case).
func unknownKey(key string, fields map[string]reflect.Type, path string) error {
	for name := range fields {
		if strings.EqualFold(name, key) {
			return fmt.Errorf("key %q%s must be spelled %q (keys are case-sensitive)", key, in(path), name)
		}
	}
	names := make([]string, 0, len(fields))
	for name := range fields {
		names = append(names, name)
	}
	sort.Strings(names)
	return fmt.Errorf("unknown key %q%s (valid keys: %s)", key, in(path), strings.Join(names, ", "))
}

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

func in(path string) string {
	if path == "" {
		return ""
	}
	return " in " + path
}

// eofErr turns the decoder's bare io.EOF into a message.
func eofErr(err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return errors.New("unexpected end of JSON input")
	}
	return err
}

// clip quotes the start of b for an error message.
func clip(b []byte) string {
	if len(b) == 0 {
		return "nothing"
	}
	if len(b) > 20 {
		return fmt.Sprintf("%q...", b[:20])
	}
	return fmt.Sprintf("%q", b)
}
