package engine

import (
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/moe-infinity/moe_infinity/go/backend"
)

// linkMeter is a backend with copy mode (silentCopies over the CPU
// backend) that measures its link with injected figures, as the CUDA
// backend measures its own, and counts the measurements.
type linkMeter struct {
	*silentCopies
	rates backend.LinkRates
	err   error
	calls atomic.Int32
}

func (m *linkMeter) MeasureLink() (backend.LinkRates, error) {
	m.calls.Add(1)
	return m.rates, m.err
}

// meterEngine configures bf16Model (2 layers of 4 experts of 4 KiB) on a
// linkMeter with cfg (budget and slots filled in) and setup.
func meterEngine(t *testing.T, m *linkMeter, cfg Config, setup Setup) (*Engine, Plan) {
	t.Helper()
	cfg.BudgetBytes, cfg.MaxSlots = 8*4096, 8
	e, err := New(cfg)
	require.NoError(t, err)
	bf16Model(t, e, 2, 4)
	e.NewBackend = onCPUBackend(func(c *backend.CPU) backend.Backend {
		m.silentCopies = &silentCopies{CPU: c}
		return m
	})
	p, err := e.Configure(setup)
	require.NoError(t, err)
	t.Cleanup(func() { _ = e.Close() })
	return e, p
}

// The experts here are 768 bytes: by size alone (no rates) graph_misses
// "auto" reads them in place. With no reaction, copying one wins exactly
// when the copy engine outruns the kernels' in-place reads.
func TestMeasuredLinkRatesDecideGraphMisses(t *testing.T) {
	off, on := false, true
	slowZC := backend.LinkRates{DMAGBps: 52, ZeroCopyGBps: 33, ReactionUs: 0}
	fastZC := backend.LinkRates{DMAGBps: 52, ZeroCopyGBps: 60, ReactionUs: 0}
	given := &LinkRates{DMAGBps: 20, ZeroCopyGBps: 40, ReactionUs: 0}
	for _, tc := range []struct {
		name      string
		cfg       Config
		measured  backend.LinkRates
		err       error
		calls     int32
		want      string // graph_misses "auto" resolved
		source    string
		rates     *LinkRates
		warnMatch string // a plan warning containing this, or "" for none
	}{
		{"default (off until validated on a GPU): by size, nothing measured", Config{}, slowZC, nil, 0, "read", LinkNone, nil, ""},
		{"zero-copy below DMA: copy", Config{MeasureLink: &on}, slowZC, nil, 1, "copy", LinkMeasured, (*LinkRates)(&slowZC), ""},
		{"zero-copy above DMA: read in place", Config{MeasureLink: &on}, fastZC, nil, 1, "read", LinkMeasured, (*LinkRates)(&fastZC), ""},
		{"given rates win and are not measured", Config{LinkRates: given, MeasureLink: &on}, slowZC, nil, 0, "read", LinkGiven, given, ""},
		{"measure_link off: by size, nothing measured", Config{MeasureLink: &off}, slowZC, nil, 0, "read", LinkNone, nil, ""},
		{"a failed measurement: by size, and the plan says why", Config{MeasureLink: &on}, slowZC, errors.New("no driver"), 1, "read", LinkFailed, nil,
			"measuring the cpu backend's host→device link failed: no driver"},
		{"figures that are not rates: failed", Config{MeasureLink: &on}, backend.LinkRates{DMAGBps: 52}, nil, 1, "read", LinkFailed, nil,
			"zero_copy_gbps 0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := &linkMeter{rates: tc.measured, err: tc.err}
			e, p := meterEngine(t, m, tc.cfg, Setup{Layout: mixtralSpec})
			assert.Equal(t, tc.calls, m.calls.Load(), "measurements")
			assert.Equal(t, tc.want, p.GraphMisses)
			assert.Equal(t, tc.source, p.LinkRatesSource)
			assert.Equal(t, tc.rates, p.LinkRates)
			if tc.warnMatch == "" {
				assert.Empty(t, p.Warnings)
			} else {
				require.Len(t, p.Warnings, 1)
				assert.Contains(t, p.Warnings[0], tc.warnMatch)
			}
			// moe_tune's "auto" resolves from the same rates, without
			// measuring again.
			for _, mode := range []string{"read", "copy", "auto"} {
				require.NoError(t, e.Tune(Tuning{GraphMisses: &mode}))
			}
			again, err := e.Plan()
			require.NoError(t, err)
			assert.Equal(t, tc.want, again.GraphMisses)
			assert.Equal(t, tc.calls, m.calls.Load(), "measured once, at Configure")
		})
	}
}

func TestTheCPUBackendHasNoLinkToMeasure(t *testing.T) {
	assert.NotImplements(t, (*backend.LinkMeter)(nil), backend.NewCPU(1))
	e, p := bf16Engine(t, Setup{Layout: mixtralSpec}, 2, 4, 8)
	assert.Equal(t, LinkNone, p.LinkRatesSource)
	assert.Nil(t, p.LinkRates)
	assert.Nil(t, e.rates)
}

func TestMeasureLinkIsParsedStrictlyAndDefaultsOff(t *testing.T) {
	for _, tc := range []struct {
		doc  string
		want bool
	}{
		{`{"budget_bytes": 1}`, false},
		{`{"budget_bytes": 1, "measure_link": null}`, false},
		{`{"budget_bytes": 1, "measure_link": true}`, true},
		{`{"budget_bytes": 1, "measure_link": false}`, false},
	} {
		c, err := ParseConfig([]byte(tc.doc))
		require.NoError(t, err, tc.doc)
		require.NotNil(t, c.MeasureLink, tc.doc)
		assert.Equal(t, tc.want, *c.MeasureLink, tc.doc)
	}
	for _, bad := range []string{
		`{"budget_bytes": 1, "measure_link": "off"}`,
		`{"budget_bytes": 1, "measure_link": 0}`,
		`{"budget_bytes": 1, "Measure_link": false}`,
	} {
		_, err := ParseConfig([]byte(bad))
		assert.ErrorIs(t, err, ErrInvalid, bad)
	}
}

// model_link makes the CPU backend's copies take the given link's time:
// four demand loads of 4 KiB at 0.001 GB/s (4.1 ms each, plus 1 ms of
// reaction) take at least four such copies' time, one after the other.
// It needs the link's rates and the CPU backend.
func TestModelLinkPacesTheCPUBackendsCopies(t *testing.T) {
	rates := &LinkRates{DMAGBps: 0.001, ZeroCopyGBps: 0.001, ReactionUs: 1000}
	e, err := New(Config{BudgetBytes: 8 * 4096, MaxSlots: 8, LinkRates: rates, ModelLink: true, Prefetch: noPrefetch()})
	require.NoError(t, err)
	bf16Model(t, e, 2, 4)
	_, err = e.Configure(Setup{Layout: mixtralSpec})
	require.NoError(t, err)
	t.Cleanup(func() { _ = e.Close() })
	copyTime := backend.LinkModel{GBps: rates.DMAGBps, Reaction: time.Millisecond}.Duration(e.lay.SlotBytes)
	start := time.Now()
	acquire(t, e, 0, 0, 1, 2, 3)
	assert.GreaterOrEqual(t, time.Since(start), 4*copyTime)
	st, err := e.Stats()
	require.NoError(t, err)
	assert.Equal(t, uint64(4), st.Layers[0].Loads)

	_, err = New(Config{BudgetBytes: 4096, ModelLink: true})
	assert.ErrorIs(t, err, ErrInvalid)
	assert.ErrorContains(t, err, "model_link needs link_rates")
	_, err = New(Config{BudgetBytes: 4096, ModelLink: true, LinkRates: rates, Backend: "cuda"})
	assert.ErrorIs(t, err, ErrInvalid)
	c, err := ParseConfig([]byte(`{"budget_bytes": 4096, "model_link": true, "link_rates": {"dma_gbps": 1, "zero_copy_gbps": 1}}`))
	require.NoError(t, err)
	assert.True(t, c.ModelLink)
}
