// Command moe-replay generates a synthetic expert-routing trace and replays
// it through the engine's expert cache under every eviction policy, with
// and without trace-driven prefetching, next to Belady's offline optimum,
// for one or more cache sizes. The logic lives in package go/sim.
//
//	go run ./go/cmd/moe-replay -layers 32 -experts 8 -topk 2 -requests 60 \
//	    -tokens 64 -clusters 4 -skew 1.0 -seed 1 -cache-frac 0.25,0.5,0.75 \
//	    [-json out.json]
package main

import (
	"bytes"
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/moe-infinity/moe_infinity/go/sim"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// run executes the command with args and returns the exit status: 0 on
// success, 2 for bad flags, 1 for other failures.
func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("moe-replay", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var p sim.GenParams
	var cfg sim.ReplayConfig
	fs.IntVar(&p.Layers, "layers", 32, "MoE layers")
	fs.IntVar(&p.Experts, "experts", 8, "experts per layer")
	fs.IntVar(&p.TopK, "topk", 2, "experts per token per layer")
	fs.IntVar(&p.Requests, "requests", 60, "requests")
	fs.IntVar(&p.TokensPerRequest, "tokens", 64, "tokens per request")
	fs.IntVar(&p.Clusters, "clusters", 4, "request clusters (requests assigned round-robin)")
	fs.Float64Var(&p.Skew, "skew", 1.0, "Zipf exponent of expert popularity within a cluster (0 = uniform)")
	fs.Int64Var(&p.Seed, "seed", 1, "generator seed")
	fracs := fs.String("cache-frac", "0.25,0.5,0.75", "comma-separated cache sizes as fractions of layers*experts")
	fs.IntVar(&cfg.PrefetchPerLayer, "prefetch-per-layer", 0, "most prefetches issued after each layer (0 = topk)")
	fs.IntVar(&cfg.EAMCCapacity, "eamc", 0, "EAM collection capacity (0 = engine default)")
	fs.IntVar(&cfg.Matches, "matches", 0, "most similar EAMs summed per prediction (0 = engine default)")
	fs.Float64Var(&cfg.PrefetchConfidence, "confidence", 0, "prefetch only experts predicted this many times as likely as uniform (0 = engine default, <0 = off)")
	fs.Float64Var(&cfg.PrefetchMinEvidence, "min-evidence", 0, "use a layer's prediction only when it rests on this many routed tokens (0 = engine default, <0 = off)")
	fs.Float64Var(&cfg.PrefetchMinTokenShare, "min-token-share", 0, "prefetch only experts predicted to serve this fraction of a layer's tokens (0 = engine default, <0 = off)")
	fs.BoolVar(&cfg.Mapped, "mapped", false, "replay mapped mode: misses are read in place and copied in only when the policy admits them")
	fs.Float64Var(&cfg.AdmitMargin, "admit-margin", 1, "with -mapped: how much more (fraction) the policy must value a miss than its victim to copy it in (the engine's default is 1)")
	fs.BoolVar(&cfg.FillOnRead, "fill-on-read", false, "with -mapped: count admissions as free (what-if: the reading kernel fills the slot)")
	jsonPath := fs.String("json", "", "also write the results as JSON to this file")
	tracePath := fs.String("trace", "", "replay this recorded trace file (JSON, see sim.ReadTrace) instead of generating one")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "moe-replay: unexpected arguments %q\n", fs.Args())
		return 2
	}
	fr, err := sim.ParseFractions(*fracs)
	if err != nil {
		fmt.Fprintln(stderr, "moe-replay:", err)
		return 2
	}
	var t *sim.Trace
	if *tracePath != "" {
		t, err = sim.ReadTraceFile(*tracePath)
	} else {
		t, err = sim.Generate(p)
	}
	if err != nil {
		fmt.Fprintln(stderr, "moe-replay:", err)
		return 2
	}
	rep, err := sim.Sweep(t, fr, cfg)
	if err != nil {
		fmt.Fprintln(stderr, "moe-replay:", err)
		return 1
	}
	if err := rep.WriteTable(stdout); err != nil {
		fmt.Fprintln(stderr, "moe-replay:", err)
		return 1
	}
	if *jsonPath != "" {
		var b bytes.Buffer
		err := rep.WriteJSON(&b)
		if err == nil {
			err = os.WriteFile(*jsonPath, b.Bytes(), 0o644)
		}
		if err != nil {
			fmt.Fprintln(stderr, "moe-replay:", err)
			return 1
		}
	}
	return 0
}
