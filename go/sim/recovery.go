package sim

import "fmt"

// Recovery describes how trace-driven prefetching recovers after the
// workload switches (for example from one domain's requests to another's).
type Recovery struct {
	// SwitchAt is the index of the first request after the switch.
	SwitchAt int `json:"switch_at"`
	// Steady is the mean per-request hit rate with prefetching over the
	// last Window requests of the trace (the new steady state).
	Steady float64 `json:"steady"`
	// Before is the mean hit rate over the Window requests before the switch.
	Before float64 `json:"before"`
	// FirstAfter is the hit rate of the first request after the switch.
	FirstAfter float64 `json:"first_after"`
	// Requests is how many requests after the switch it takes until a
	// request's hit rate is within Tolerance of Steady (1 = the first
	// request already is); -1 if none is.
	Requests int `json:"requests"`
	// Tolerance is the relative tolerance used (0.05 = within 5%).
	Tolerance float64 `json:"tolerance"`
	// Window is the number of requests averaged for Steady and Before.
	Window int `json:"window"`
	// WithPrefetch and WithoutPrefetch are the per-request hit rates.
	WithPrefetch    []float64 `json:"with_prefetch"`
	WithoutPrefetch []float64 `json:"without_prefetch"`
}

// MeasureRecovery replays t with and without prefetching (cfg gives the
// cache size and policy) and measures the recovery after request switchAt.
func MeasureRecovery(t *Trace, cfg ReplayConfig, switchAt, window int, tolerance float64) (Recovery, error) {
	if switchAt <= 0 || switchAt >= len(t.Requests) {
		return Recovery{}, fmt.Errorf("sim: switch at request %d of %d", switchAt, len(t.Requests))
	}
	if window < 1 || window > switchAt || window > len(t.Requests)-switchAt {
		return Recovery{}, fmt.Errorf("sim: window %d does not fit %d requests before and %d after the switch", window, switchAt, len(t.Requests)-switchAt)
	}
	cfg.PerRequest = true
	cfg.Prefetch = true
	on, err := Replay(t, cfg)
	if err != nil {
		return Recovery{}, err
	}
	cfg.Prefetch = false
	off, err := Replay(t, cfg)
	if err != nil {
		return Recovery{}, err
	}
	r := Recovery{SwitchAt: switchAt, Tolerance: tolerance, Window: window,
		WithPrefetch: on.RequestHitRates, WithoutPrefetch: off.RequestHitRates}
	rates := on.RequestHitRates
	r.Steady = mean(rates[len(rates)-window:])
	r.Before = mean(rates[switchAt-window : switchAt])
	r.FirstAfter = rates[switchAt]
	r.Requests = -1
	for i := switchAt; i < len(rates); i++ {
		if rates[i] >= r.Steady*(1-tolerance) {
			r.Requests = i - switchAt + 1
			break
		}
	}
	return r, nil
}

func mean(xs []float64) float64 {
	s := 0.0
	for _, x := range xs {
		s += x
	}
	return s / float64(len(xs))
}
