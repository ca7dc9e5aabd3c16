// Command moe-recovery measures how many requests trace-driven prefetching
// needs to recover after a switch of workload in a recorded trace:
//
//	go run ./go/cmd/moe-recovery -trace switch.json -switch 24 -cache-frac 0.25
//
// It prints a JSON sim.Recovery.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/moe-infinity/moe_infinity/go/cache"
	"github.com/moe-infinity/moe_infinity/go/sim"
)

func main() { os.Exit(run(os.Args[1:], os.Stdout, os.Stderr)) }

func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("moe-recovery", flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("trace", "", "recorded trace file (JSON)")
	at := fs.Int("switch", 0, "index of the first request after the switch")
	frac := fs.Float64("cache-frac", 0.25, "cache size as a fraction of layers*experts")
	window := fs.Int("window", 5, "requests averaged for the steady state")
	tol := fs.Float64("tolerance", 0.05, "relative tolerance to the steady state")
	policy := fs.String("policy", "priority", "eviction policy")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	p, err := cache.ParsePolicy(*policy)
	if err != nil {
		fmt.Fprintln(stderr, "moe-recovery:", err)
		return 2
	}
	t, err := sim.ReadTraceFile(*path)
	if err != nil {
		fmt.Fprintln(stderr, "moe-recovery:", err)
		return 2
	}
	slots := sim.SlotsForFraction(t.Layers, t.Experts, *frac)
	r, err := sim.MeasureRecovery(t, sim.ReplayConfig{Slots: slots, Policy: p}, *at, *window, *tol)
	if err != nil {
		fmt.Fprintln(stderr, "moe-recovery:", err)
		return 1
	}
	enc := json.NewEncoder(stdout)
	enc.SetIndent("", " ")
	if err := enc.Encode(r); err != nil {
		fmt.Fprintln(stderr, "moe-recovery:", err)
		return 1
	}
	return 0
}
