package sim

import (
	"fmt"
	"testing"
)

func TestExplore(t *testing.T) {
	tr, _ := Generate(GenParams{Layers: 32, Experts: 8, TopK: 2, Requests: 60, TokensPerRequest: 64, Clusters: 4, Skew: 1, Seed: 1})
	on, _ := Replay(tr, ReplayConfig{Slots: 64, Policy: 0, Prefetch: true})
	fmt.Printf("direct %+v\n", on)
	on, _ = Replay(tr, ReplayConfig{Slots: 64, Policy: 0, Prefetch: true})
	fmt.Printf("direct %+v\n", on)
	res, _ := Compare(tr, 64)
	fmt.Printf("compare %+v\n", res[1])
}
