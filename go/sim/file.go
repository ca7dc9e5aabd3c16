package sim

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"github.com/moe-infinity/moe_infinity/go/strictjson"
)

// traceFile is the on-disk form of a Trace (recorded or generated).
type traceFile struct {
	Label    string     `json:"label"`
	Params   *GenParams `json:"params,omitempty"`
	Layers   int        `json:"layers"`
	Experts  int        `json:"experts"`
	Requests []Request  `json:"requests"`
}

// ReadTrace reads a trace written by WriteTrace (or by any tool writing
// the same JSON: {"label", "layers", "experts", "requests": [{"cluster",
// "tokens": [[[expert ids of layer 0], ...], ...]}]}) and validates it.
// The file must hold one JSON object, keys spelled exactly, and nothing
// after it (strictjson.Decode).
func ReadTrace(r io.Reader) (*Trace, error) {
	b, err := io.ReadAll(r)
	if err != nil {
		return nil, fmt.Errorf("sim: reading trace: %w", err)
	}
	var f traceFile
	if err := strictjson.Decode(b, &f); err != nil {
		return nil, fmt.Errorf("sim: reading trace: %w", err)
	}
	t := &Trace{Label: f.Label, Params: f.Params, Layers: f.Layers, Experts: f.Experts, Requests: f.Requests}
	if err := t.Validate(); err != nil {
		return nil, err
	}
	return t, nil
}

// ReadTraceFile reads a trace file (see ReadTrace).
func ReadTraceFile(path string) (*Trace, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("sim: %w", err)
	}
	defer f.Close()
	return ReadTrace(f)
}

// WriteTrace writes t as JSON.
func WriteTrace(w io.Writer, t *Trace) error {
	return json.NewEncoder(w).Encode(traceFile{Label: t.Label, Params: t.Params, Layers: t.Layers, Experts: t.Experts, Requests: t.Requests})
}
