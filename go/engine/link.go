package engine

import (
	"fmt"

	"github.com/moe-infinity/moe_infinity/go/backend"
)

// Where Plan.LinkRates came from (Plan.LinkRatesSource).
const (
	// LinkGiven: Config.LinkRates; nothing was measured.
	LinkGiven = "given"
	// LinkMeasured: the backend measured them at Configure.
	LinkMeasured = "measured"
	// LinkFailed: the measurement failed (Plan.Warnings says why); the
	// engine runs without rates.
	LinkFailed = "failed"
	// LinkNone: not given, and the backend has no link to measure (the
	// CPU backend) or Config.MeasureLink is off.
	LinkNone = "none"
)

// LinkSources lists the values of Plan.LinkRatesSource.
var LinkSources = []string{LinkGiven, LinkMeasured, LinkFailed, LinkNone}

// linkRates returns the link rates the engine's choices rest on, where
// they came from and, when a measurement failed, a warning for the plan.
// Rates the user gave win and are not measured. Otherwise a backend that
// can measure its link (backend.LinkMeter) measures it once, unless
// cfg.MeasureLink is off. A failed measurement (an error, or figures that
// are not finite rates > 0) is not fatal: the engine serves without rates,
// as before there were any, and says so (LinkFailed and the warning).
func linkRates(cfg Config, m backend.LinkMeter, name string) (rates *LinkRates, source, warning string) {
	if cfg.LinkRates != nil {
		return cfg.LinkRates, LinkGiven, ""
	}
	if m == nil || (cfg.MeasureLink != nil && !*cfg.MeasureLink) {
		return nil, LinkNone, ""
	}
	got, err := m.MeasureLink()
	r := LinkRates(got)
	if err == nil {
		if r.check() != nil {
			err = fmt.Errorf("it gave dma_gbps %v, zero_copy_gbps %v, reaction_us %v, which are not finite rates > 0", r.DMAGBps, r.ZeroCopyGBps, r.ReactionUs)
		}
	}
	if err != nil {
		return nil, LinkFailed, fmt.Sprintf(`link rates: measuring the %s backend's host→device link failed: %v; graph_misses "auto" decides by expert size (give link_rates to choose from rates)`, name, err)
	}
	return &r, LinkMeasured, ""
}
