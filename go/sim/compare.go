package sim

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"

	"github.com/moe-infinity/moe_infinity/go/cache"
)

// BeladyPolicy is the Policy name of Belady rows.
const BeladyPolicy = "belady-optimal"

// Compare replays t with a cache of slots slots under every policy
// (priority, lru, lfu), each with prefetching off and on, using the
// engine's defaults for everything else, and appends the Belady bound. See
// CompareWith.
func Compare(t *Trace, slots int) ([]Result, error) {
	return CompareWith(t, ReplayConfig{Slots: slots})
}

// CompareWith is Compare with the non-policy settings (EAMC capacity,
// matches, prefetches per layer, prefetch confidence and minimum
// evidence) taken from base; base.Policy and
// base.Prefetch are ignored. The rows are, in order: priority off, priority
// on, lru off, lru on, lfu off, lfu on, then a row with Policy
// "belady-optimal" and Prefetch false. The replays run concurrently.
func CompareWith(t *Trace, base ReplayConfig) ([]Result, error) {
	if err := t.Validate(); err != nil {
		return nil, err
	}
	base.Policy, base.Prefetch = cache.PolicyPriority, false
	if _, err := base.withDefaults(t); err != nil {
		return nil, err
	}
	out := make([]Result, 2*len(cache.Policies)+1)
	errs := make([]error, len(out))
	var wg sync.WaitGroup
	for i := range 2 * len(cache.Policies) {
		cfg := base
		cfg.Policy = cache.Policy(i / 2)
		cfg.Prefetch = i%2 == 1
		wg.Go(func() { out[i], errs[i] = Replay(t, cfg) })
	}
	wg.Go(func() {
		hits, acc := Belady(t, base.Slots)
		out[len(out)-1] = Result{
			Label: t.Label, Policy: BeladyPolicy, Slots: base.Slots,
			Accesses: acc, Hits: hits, Misses: acc - hits, HitRate: ratio(hits, acc),
		}
	})
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return out, nil
}

// Report is the outcome of Sweep: the trace's description and one Run per
// cache fraction.
type Report struct {
	// Label is the trace's label.
	Label string `json:"label"`
	// Params are the generation parameters (nil for recorded traces).
	Params *GenParams `json:"params,omitempty"`
	// Layers is the trace's number of MoE layers.
	Layers int `json:"layers"`
	// Experts is the trace's number of experts per layer.
	Experts int `json:"experts"`
	// Requests is the number of requests replayed.
	Requests int `json:"requests"`
	// Accesses is the number of expert uses of one replay.
	Accesses uint64 `json:"accesses"`
	// DistinctExperts is the number of distinct (layer, expert) pairs used.
	DistinctExperts int `json:"distinct_experts"`
	// Runs holds the results per cache fraction, in the order requested.
	Runs []Run `json:"runs"`
}

// Run is Compare's results for one cache size.
type Run struct {
	// CacheFrac is the requested fraction of all experts the cache holds.
	CacheFrac float64 `json:"cache_frac"`
	// Slots is the resulting number of slots (see SlotsForFraction).
	Slots int `json:"slots"`
	// Results are CompareWith's rows.
	Results []Result `json:"results"`
}

// SlotsForFraction returns the number of slots that holds frac of all
// layers*experts experts, rounded to the nearest integer and at least 1.
func SlotsForFraction(layers, experts int, frac float64) int {
	return max(1, int(math.Round(frac*float64(layers)*float64(experts))))
}

// ParseFractions parses a comma-separated list of cache fractions such as
// "0.25,0.5,0.75"; each must be a number in (0, 1].
func ParseFractions(s string) ([]float64, error) {
	var out []float64
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		v, err := strconv.ParseFloat(f, 64)
		if err != nil || !(v > 0 && v <= 1) {
			return nil, fmt.Errorf("sim: cache fraction %q is not a number in (0, 1]", f)
		}
		out = append(out, v)
	}
	return out, nil
}

// Sweep runs CompareWith for every cache fraction (slots from
// SlotsForFraction over t's layers and experts; base.Slots is ignored).
// A fraction too small to hold one layer's experts is an error.
func Sweep(t *Trace, fracs []float64, base ReplayConfig) (*Report, error) {
	if err := t.Validate(); err != nil {
		return nil, err
	}
	if len(fracs) == 0 {
		return nil, errors.New("sim: no cache fractions")
	}
	r := &Report{
		Label: t.Label, Params: t.Params, Layers: t.Layers, Experts: t.Experts,
		Requests: len(t.Requests), Accesses: t.Accesses(), DistinctExperts: t.DistinctKeys(),
	}
	for _, f := range fracs {
		cfg := base
		cfg.Slots = SlotsForFraction(t.Layers, t.Experts, f)
		res, err := CompareWith(t, cfg)
		if err != nil {
			return nil, fmt.Errorf("cache fraction %g (%d slots): %w", f, cfg.Slots, err)
		}
		r.Runs = append(r.Runs, Run{CacheFrac: f, Slots: cfg.Slots, Results: res})
	}
	return r, nil
}

// WriteTable prints the report as an aligned text table, one row per
// policy and prefetch setting (and Belady) for each cache fraction.
func (r *Report) WriteTable(w io.Writer) error {
	var b strings.Builder
	fmt.Fprintf(&b, "trace: %s\n", r.Label)
	fmt.Fprintf(&b, "%d layers x %d experts, %d requests, %d expert accesses per run, %d distinct experts used\n",
		r.Layers, r.Experts, r.Requests, r.Accesses, r.DistinctExperts)
	fmt.Fprintf(&b, "precision = prefetch hits / prefetch loads; recall = prefetch hits / (prefetch hits + misses)\n\n")
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "cache\tslots\tpolicy\tprefetch\thits\tmisses\thit rate\tpf loads\tpf hits\twasted\tprecision\trecall\tlink/access\t")
	for _, run := range r.Runs {
		for _, x := range run.Results {
			pf, prec, rec := "off", "-", "-"
			if x.Prefetch {
				pf = "on"
				prec = fmt.Sprintf("%.3f", x.PrefetchPrecision)
				rec = fmt.Sprintf("%.3f", x.PrefetchRecall)
			}
			link := "-"
			if x.Policy != "belady-optimal" {
				link = fmt.Sprintf("%.3f", x.LinkPerAccess)
			}
			fmt.Fprintf(tw, "%.4g%%\t%d\t%s\t%s\t%d\t%d\t%.3f\t%d\t%d\t%d\t%s\t%s\t%s\t\n",
				100*run.CacheFrac, run.Slots, x.Policy, pf, x.Hits, x.Misses, x.HitRate,
				x.PrefetchLoads, x.PrefetchHits, x.WastedPrefetches, prec, rec, link)
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// WriteJSON writes the report as indented JSON.
func (r *Report) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}
