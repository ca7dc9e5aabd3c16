package sim

import (
	"bytes"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// FuzzReadTrace: trace files are outside input (moe-replay -trace,
// moe-recovery). ReadTrace never panics; what it accepts is one JSON
// object with nothing after it, a valid trace (every token routes in
// every layer to distinct expert ids in range), and it round-trips through WriteTrace unchanged.
func FuzzReadTrace(f *testing.F) {
	tr, err := Generate(GenParams{Layers: 2, Experts: 4, TopK: 2, Requests: 2, TokensPerRequest: 2, Clusters: 1, Skew: 1, Seed: 1})
	require.NoError(f, err)
	var gen bytes.Buffer
	require.NoError(f, WriteTrace(&gen, tr))
	for _, s := range []string{
		gen.String(),
		`{"label": "r", "layers": 1, "experts": 2, "requests": [{"cluster": 0, "tokens": [[[0, 1]], [[1]]]}]}`,
		`{"label": "r", "layers": 2, "experts": 3, "requests": [{"cluster": 1, "tokens": [[[0], [2]]]}, {"cluster": 0, "tokens": []}]}`,
		`{"label": "r", "layers": 1, "experts": 2, "requests": [{"cluster": 0, "tokens": [[[1, 1]]]}]}`,
		`{"label": "r", "layers": 1, "experts": 2, "requests": [{"cluster": 0, "tokens": [[[2]]]}]}`,
		`{"label": "r", "layers": 1, "experts": 2, "requests": []} {"label": "s"}`,
		`{"label": "r", "Layers": 1, "experts": 2, "requests": []}`,
		`{"label": "r", "layers": 1, "layers": 2, "experts": 2, "requests": []}`,
		`{"label": "x", "layers": 0, "experts": 2, "requests": []}`,
		`null`, ``, `{`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		tr, err := ReadTrace(bytes.NewReader(b))
		if err != nil {
			require.Nil(t, tr)
			require.True(t, strings.HasPrefix(err.Error(), "sim: "), "error without package prefix: %v", err)
			return
		}
		require.NoError(t, tr.Validate())
		trimmed := bytes.TrimSpace(b)
		require.True(t, len(trimmed) > 0 && trimmed[0] == '{' && trimmed[len(trimmed)-1] == '}', "accepted %q", b)
		for _, tail := range []string{"x", "}", "{}", " 0"} {
			_, err := ReadTrace(bytes.NewReader(append(bytes.Clone(b), tail...)))
			require.Error(t, err, "accepted %q followed by %q", b, tail)
		}
		for r, req := range tr.Requests {
			for i, tok := range req.Tokens {
				require.Len(t, tok, tr.Layers, "request %d token %d", r, i)
				for l, ids := range tok {
					seen := map[int32]bool{}
					for _, x := range ids {
						require.True(t, x >= 0 && int(x) < tr.Experts && !seen[x], "request %d token %d layer %d: ids %v of %d experts", r, i, l, ids, tr.Experts)
						seen[x] = true
					}
				}
			}
		}
		var out bytes.Buffer
		require.NoError(t, WriteTrace(&out, tr))
		back, err := ReadTrace(&out)
		require.NoError(t, err, "a trace does not read back its own file: %s", out.Bytes())
		require.Equal(t, tr, back)
	})
}
