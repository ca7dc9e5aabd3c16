package engine

import (
	"math"
	"testing"

	"github.com/stretchr/testify/assert"
)

// costs is a cost model in round numbers: 1 GB experts cross the link in
// 1 s and are computed on the CPU in cpuS s, without contention or fixed
// costs unless a case sets them.
func costs(cpuS float64) HybridCosts {
	return HybridCosts{LinkGBps: 1, CPUGBps: 1 / cpuS, LinkShare: 1, CPUShare: 1}
}

func TestChooseMisses(t *testing.T) {
	const B = 1e9
	cold := func(x int32, tokens int64) Miss { return Miss{Expert: x, Tokens: tokens} }
	hot := func(x int32) Miss { return Miss{Expert: x, Tokens: 1, Reuse: 0.9} }
	C, R, P := MissCopy, MissRead, MissCPU
	for _, tc := range []struct {
		name   string
		in     MissInputs
		want   []MissWay
		finish float64
	}{
		{"no misses", MissInputs{Costs: costs(1), ExpertBytes: B, CPU: true, HotShare: 0.5}, []MissWay{}, 0},
		{"without the CPU every miss is copied", MissInputs{Costs: costs(1), ExpertBytes: B, HotShare: 0.5,
			Misses: []Miss{cold(0, 1), cold(1, 1)}}, []MissWay{C, C}, 2},
		{"a hot miss is copied even when the CPU is idle and faster", MissInputs{Costs: costs(0.1), ExpertBytes: B, CPU: true, HotShare: 0.5,
			Misses: []Miss{hot(3)}}, []MissWay{C}, 1},
		{"a cold miss goes to the idle CPU when it finishes sooner", MissInputs{Costs: costs(0.5), ExpertBytes: B, CPU: true, HotShare: 0.5,
			Misses: []Miss{cold(2, 1)}}, []MissWay{P}, 0.5},
		{"a cold miss stays on the link when the CPU is slower", MissInputs{Costs: costs(2), ExpertBytes: B, CPU: true, HotShare: 0.5,
			Misses: []Miss{cold(2, 1)}}, []MissWay{C}, 1},
		{"a tie goes to the link", MissInputs{Costs: costs(1), ExpertBytes: B, CPU: true, HotShare: 0.5,
			Misses: []Miss{cold(2, 1)}}, []MissWay{C}, 1},
		{"the CPU takes cold misses while its queue ends before the link's", MissInputs{Costs: costs(1), ExpertBytes: B, CPU: true, HotShare: 0.5,
			Misses: []Miss{hot(0), hot(1), cold(2, 1), cold(3, 1), cold(4, 1)}}, []MissWay{C, C, P, P, C}, 3},
		{"equal link and CPU split the cold misses", MissInputs{Costs: costs(1), ExpertBytes: B, CPU: true, HotShare: 0.5,
			Misses: []Miss{cold(0, 1), cold(1, 1), cold(2, 1), cold(3, 1)}}, []MissWay{C, P, C, P}, 2},
		{"fewest tokens go to the CPU first", MissInputs{Costs: HybridCosts{LinkGBps: 1, CPUGBps: 1, CPUTokenCost: 1, LinkShare: 1, CPUShare: 1},
			ExpertBytes: B, CPU: true, HotShare: 0.5,
			Misses: []Miss{cold(0, 4), cold(1, 1), cold(2, 1)}}, []MissWay{C, C, P}, 2},
		{"many tokens make the CPU dearer than the link", MissInputs{Costs: HybridCosts{LinkGBps: 1, CPUGBps: 2, CPUTokenCost: 0.5, LinkShare: 1, CPUShare: 1},
			ExpertBytes: B, CPU: true, HotShare: 0.5,
			Misses: []Miss{cold(0, 16)}}, []MissWay{C}, 1},
		{"contention: shares below 1 lengthen the overlap", MissInputs{Costs: HybridCosts{LinkGBps: 1, CPUGBps: 1.25, LinkShare: 0.5, CPUShare: 0.5},
			ExpertBytes: B, CPU: true, HotShare: 0.5,
			// link 1 s of hot work; the cold one on the CPU (0.8 s solo)
			// runs at half speed beside it and ends at 1.6 s, when the link
			// has 0.2 s left: 1.8 s against 2 s on the link.
			Misses: []Miss{hot(0), cold(1, 1)}}, []MissWay{C, P}, 1.8},
		{"strong contention keeps a cold miss on the link", MissInputs{Costs: HybridCosts{LinkGBps: 1, CPUGBps: 1.25, LinkShare: 0.3, CPUShare: 0.3},
			ExpertBytes: B, CPU: true, HotShare: 0.5,
			Misses: []Miss{hot(0), cold(1, 1)}}, []MissWay{C, C}, 2},
		{"the CPU's fixed cost counts once", MissInputs{Costs: HybridCosts{LinkGBps: 1, CPUGBps: 4, CPUFixedUs: 600e3, LinkShare: 1, CPUShare: 1},
			ExpertBytes: B, CPU: true, HotShare: 0.5,
			// the first on the CPU: 0.6 + 0.25 < 1 on the link; the second
			// would end the CPU at 1.1 > 1 on the link; then the CPU again
			// (1.1 and 1.35 against 2 on the link)
			Misses: []Miss{cold(0, 1), cold(1, 1), cold(2, 1), cold(3, 1)}}, []MissWay{P, C, P, P}, 1.35},
		{"the hand-off's fixed cost joins the CPU's", MissInputs{Costs: HybridCosts{LinkGBps: 1, CPUGBps: 4, CPUFixedUs: 300e3, HandOffFixedUs: 300e3, LinkShare: 1, CPUShare: 1},
			ExpertBytes: B, CPU: true, HotShare: 0.5,
			// as above: 0.3 + 0.3 of fixed costs, once
			Misses: []Miss{cold(0, 1), cold(1, 1), cold(2, 1), cold(3, 1)}}, []MissWay{P, C, P, P}, 1.35},
		{"a hand-off dearer than the link keeps the CPU out", MissInputs{Costs: HybridCosts{LinkGBps: 1, CPUGBps: 4, HandOffFixedUs: 2e6, LinkShare: 1, CPUShare: 1},
			ExpertBytes: B, CPU: true, HotShare: 0.5,
			Misses: []Miss{cold(0, 1), cold(1, 1)}}, []MissWay{C, C}, 2},
		{"the link's fixed cost counts once", MissInputs{Costs: HybridCosts{LinkGBps: 1, LinkFixedUs: 500e3, CPUGBps: 1 / 1.2, LinkShare: 1, CPUShare: 1},
			ExpertBytes: B, CPU: true, HotShare: 0.5,
			// the first on the CPU (1.2 s against 0.5 + 1 on the link), the
			// second on the link (1.5 against 2.4 on the CPU)
			Misses: []Miss{cold(0, 1), cold(1, 1)}}, []MissWay{P, C}, 1.5},
		{"MaxCPU bounds the CPU's share", MissInputs{Costs: costs(0.1), ExpertBytes: B, CPU: true, MaxCPU: 1, HotShare: 0.5,
			Misses: []Miss{cold(0, 1), cold(1, 1)}}, []MissWay{P, C}, 1},
		{"a cold miss crossing the link is read in place when reads are as fast", MissInputs{Costs: HybridCosts{LinkGBps: 1, ReadGBps: 1, CPUGBps: 0.5, LinkShare: 1, CPUShare: 1},
			ExpertBytes: B, CPU: true, Read: true, HotShare: 0.5,
			Misses: []Miss{hot(0), cold(1, 1)}}, []MissWay{C, R}, 2},
		{"slower in-place reads copy instead", MissInputs{Costs: HybridCosts{LinkGBps: 1, ReadGBps: 0.5, LinkShare: 1, CPUShare: 1},
			ExpertBytes: B, Read: true, HotShare: 0.5,
			Misses: []Miss{cold(1, 1)}}, []MissWay{C}, 1},
		{"a prediction below HotShare is cold", MissInputs{Costs: costs(0.5), ExpertBytes: B, CPU: true, HotShare: 0.5,
			Misses: []Miss{{Expert: 0, Tokens: 1, Reuse: 0.4}}}, []MissWay{P}, 0.5},
		{"HotShare 0: any prediction is hot, none is cold", MissInputs{Costs: costs(0.5), ExpertBytes: B, CPU: true,
			Misses: []Miss{{Expert: 0, Tokens: 1, Reuse: 0.01}, cold(1, 1)}}, []MissWay{C, P}, 1},
		{"costs that cannot compare the sides leave the CPU out", MissInputs{Costs: HybridCosts{LinkGBps: 1, CPUGBps: 10, LinkShare: 0, CPUShare: 1},
			ExpertBytes: B, CPU: true, HotShare: 0.5,
			Misses: []Miss{cold(0, 1)}}, []MissWay{C}, 1},
		{"a negative hand-off cost cannot compare the sides", MissInputs{Costs: HybridCosts{LinkGBps: 1, CPUGBps: 10, HandOffFixedUs: -1, LinkShare: 1, CPUShare: 1},
			ExpertBytes: B, CPU: true, HotShare: 0.5,
			Misses: []Miss{cold(0, 1)}}, []MissWay{C}, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := ChooseMisses(tc.in)
			assert.Equal(t, tc.want, got.Ways)
			assert.InDelta(t, tc.finish, got.FinishS, 1e-9)
		})
	}
}

func TestMakespan(t *testing.T) {
	c := HybridCosts{LinkShare: 0.5, CPUShare: 0.25}
	assert.Equal(t, 0.0, Makespan(0, 0, c))
	assert.Equal(t, 2.0, Makespan(2, 0, c), "one side alone runs at its full rate")
	assert.Equal(t, 3.0, Makespan(0, 3, c))
	// link 1 s solo takes 2 s at half rate; the CPU does 0.5 s of its 1 s
	// meanwhile, then the rest at full rate.
	assert.InDelta(t, 2.5, Makespan(1, 1, HybridCosts{LinkShare: 0.5, CPUShare: 0.25}), 1e-12)
	// CPU 0.1 s solo takes 0.4 s; the link does 0.2 of its 1 s meanwhile.
	assert.InDelta(t, 1.2, Makespan(1, 0.1, c), 1e-12)
	assert.InDelta(t, 1.0, Makespan(1, 1, HybridCosts{LinkShare: 1, CPUShare: 1}), 1e-12, "no contention: the longer side")
	for _, l := range []float64{0.1, 1, 3} {
		for _, p := range []float64{0.2, 1, 5} {
			m := Makespan(l, p, c)
			assert.GreaterOrEqual(t, m, max(l, p), "never sooner than either side alone")
			assert.LessOrEqual(t, m, max(l/c.LinkShare, p/c.CPUShare)+1e-12, "never later than the slower side slowed throughout")
		}
	}
}

func TestCPUFinish(t *testing.T) {
	c := HybridCosts{LinkShare: 0.5, CPUShare: 0.25}
	tests := []struct {
		name      string
		link, cpu float64
		want      float64
		why       string
	}{
		{"nothing on the CPU", 1, 0, 0, "no CPU work finishes at once"},
		{"the CPU alone runs at its full rate", 0, 3, 3, ""},
		{"the CPU slowed throughout (done before the link)", 1, 0.1, 0.4, "0.1 s at a quarter rate"},
		{"the link done first, then the CPU at its full rate", 1, 1, 2.5, "link 2 s slowed; the CPU did 0.5 s meanwhile"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			assert.InDelta(t, tc.want, CPUFinish(tc.link, tc.cpu, c), 1e-12, tc.why)
		})
	}
	for _, l := range []float64{0, 0.1, 1, 3} {
		for _, p := range []float64{0.2, 1, 5} {
			assert.LessOrEqual(t, CPUFinish(l, p, c), Makespan(l, p, c)+1e-12, "the CPU is never done after the layer")
		}
	}
}

func TestCPUCalibration(t *testing.T) {
	var k CPUCalibration
	assert.Equal(t, 1.0, k.Scale(), "the zero value trusts the probe")
	assert.Zero(t, k.Calls())
	for _, bad := range [][2]float64{{0, 1}, {1, 0}, {-1, 1}, {math.NaN(), 1}, {1, math.Inf(1)}} {
		k.Observe(bad[0], bad[1])
	}
	assert.Equal(t, 1.0, k.Scale(), "calls without an expectation or a time are ignored")
	assert.Zero(t, k.Calls())

	k.Observe(1, 100)
	assert.InDelta(t, math.Pow(2, calibrationStep), k.Scale(), 1e-12, "one outlier moves it by at most 2^0.2")

	// A CPU twice as slow as the probe, observed under the calibrated
	// costs (the expectation scales with Scale): Scale converges to 2.
	var slow CPUCalibration
	for range 60 {
		expect := 1e-3 * slow.Scale()
		slow.Observe(expect, 2e-3)
	}
	assert.InDelta(t, 2, slow.Scale(), 1e-3)
	assert.Equal(t, int64(60), slow.Calls())

	var fast CPUCalibration
	for range 60 {
		fast.Observe(1e-3*fast.Scale(), 0.5e-3)
	}
	assert.InDelta(t, 0.5, fast.Scale(), 1e-3, "a faster CPU than probed gets more work")
}

func TestHybridCostsScaleCPU(t *testing.T) {
	c := HybridCosts{LinkGBps: 50, CPUGBps: 30, CPUFixedUs: 2, HandOffFixedUs: 8, LinkFixedUs: 4, LinkShare: 0.9, CPUShare: 0.5}
	s := c.ScaleCPU(2)
	assert.Equal(t, HybridCosts{LinkGBps: 50, CPUGBps: 15, CPUFixedUs: 4, HandOffFixedUs: 16, LinkFixedUs: 4, LinkShare: 0.9, CPUShare: 0.5}, s,
		"the CPU side takes twice as long; the link's figures stay")
	for _, bad := range []float64{0, -1, math.NaN(), math.Inf(1)} {
		assert.Equal(t, c, c.ScaleCPU(bad))
	}
}
