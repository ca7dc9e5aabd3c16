// Package sim replays expert-routing traces through the offloading engine's
// real expert cache (go/cache), tracer (go/trace) and prefetch planner
// (go/prefetch), without a backend: every load completes instantly, so the
// simulator measures residency decisions only (hit rates, prefetch
// precision and recall), not transfer times.
//
// A Trace is a sequence of requests; each request is a sequence of tokens
// and each token names, for every MoE layer, the distinct experts its
// router picked. Traces are either generated synthetically (Generate, with
// the generation parameters recorded in Trace.Params and Trace.Label) or
// built from recorded routing decisions (Params nil).
//
// Replay drives one cache configuration (slots, eviction policy, prefetch
// on or off) through a trace by calling go/core, the decision core go/engine
// calls for every layer (so the two cannot drift apart); Belady computes
// the offline optimum for the same access sequence; Compare and Sweep
// tabulate both.
package sim
