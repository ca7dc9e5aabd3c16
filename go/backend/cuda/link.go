//go:build cuda

package cuda

import (
	"fmt"
	"math"
	"slices"
	"sync/atomic"
	"time"
	"unsafe"

	"gorgonia.org/cu"

	"github.com/moe-infinity/moe_infinity/go/backend"
)

// The link measurement (backend.LinkMeter): ~0.5 GB over the link and
// 64 MiB pinned, meant to take under 0.2 s:
//
//   - DMA: linkProbeBytes (64 MiB, less when the GPU has less than twice
//     that free) copied from pinned host memory into device memory by the
//     copy engine, timed with CUDA events; one warm-up copy, then the best
//     of linkRuns.
//   - Zero copy: moe_link_read reads the same pinned buffer in place, as
//     the FFN kernels read a missed expert's rows in mapped mode (a warp a
//     row of linkRowBytes, 16-byte loads), timed and chosen the same way.
//   - Reaction: copy mode's handshake with nothing to copy, linkReactions
//     times. moe_publish_wait (the kernel a captured layer runs) publishes
//     an empty routing to pinned host memory; the host, spinning on it as
//     AwaitLayer does, answers with the 4-byte write ServeLayer makes for a
//     layer without misses, on a stream of its own; the kernel records the
//     GPU time it waited, from publishing to seeing the answer. The median
//     is taken: the reaction is paid on every layer, so the typical round
//     trip matters, not the luckiest. It leaves out the engine's own
//     choice of slots between the two (~0.5 µs, BenchmarkCopyLayerLoads)
//     and counts the answer's write where copy mode would issue its first
//     copy.
const (
	linkProbeBytes = 64 << 20 // bytes copied and read per timed run
	linkProbeMin   = 4 << 20  // below this the GPU is too full to measure
	linkRowBytes   = 4096     // a row of 2048 bfloat16 weights (Qwen3-30B-A3B's hidden size)
	linkRuns       = 3        // timed runs per bandwidth, after one warm-up
	linkReactions  = 15       // timed handshakes, after one warm-up
	// linkReactionTimeout bounds one handshake: the kernel gives up after
	// it (GPU time) and the host stops spinning after twice it.
	linkReactionTimeout = 100 * time.Millisecond
)

var _ backend.LinkMeter = (*Backend)(nil)

// MeasureLink measures the host→device link (see above): the copy engine's
// bandwidth, the kernels' zero-copy read bandwidth and copy mode's
// reaction. It needs an opened backend and allocates, for its duration,
// up to 64 MiB of device memory and as much pinned host memory.
func (b *Backend) MeasureLink() (backend.LinkRates, error) {
	b.mu.Lock()
	ok, closed := b.opened, b.closed
	b.mu.Unlock()
	switch {
	case closed:
		return backend.LinkRates{}, backend.ErrClosed
	case !ok:
		return backend.LinkRates{}, fmt.Errorf("backend cuda: measuring the link before Open")
	}
	var r backend.LinkRates
	err := b.dev.do(func() (err error) {
		p, err := b.newLinkProbe()
		if err != nil {
			return err
		}
		defer func() {
			if ferr := p.free(); err == nil {
				err = ferr
			}
		}()
		if r.DMAGBps, err = p.bandwidth(func() error { return copyHtoD(p.dev, p.host, p.n, p.stream) }); err != nil {
			return fmt.Errorf("timing DMA copies: %w", err)
		}
		rows := p.n / linkRowBytes
		const warps = 8
		read := func() error {
			return launch(p.read, int((rows+warps-1)/warps), 1, 32*warps, p.stream,
				p.hostDev, uint64(rows), linkRowBytes/16, p.scratch)
		}
		if r.ZeroCopyGBps, err = p.bandwidth(read); err != nil {
			return fmt.Errorf("timing zero-copy reads: %w", err)
		}
		if r.ReactionUs, err = p.reaction(); err != nil {
			return fmt.Errorf("timing copy mode's handshake: %w", err)
		}
		return nil
	})
	if err != nil {
		return backend.LinkRates{}, fmt.Errorf("backend cuda: measuring the link: %w", err)
	}
	return r, nil
}

// linkProbe is the memory, streams and events of one measurement.
type linkProbe struct {
	b       *Backend
	n       int64          // bytes per timed run
	host    unsafe.Pointer // pinned, mapped: n bytes, then the handshake's box
	hostDev uint64
	dev     uint64 // n bytes, then scratch
	scratch uint64 // device: moe_link_read's out (4 bytes), counter, ready (4 each), wait_acc (8)
	stream  uintptr
	answer  uintptr // the handshake's answering stream
	start   uintptr
	stop    uintptr
	read    cu.Function // moe_link_read
	publish cu.Function // moe_publish_wait
}

// linkBox is the size of the handshake's pinned box after the probe
// buffer: seq, late (4 bytes each), wait_host (8).
const linkBox = 16

// newLinkProbe allocates a probe. Runs in do.
func (b *Backend) newLinkProbe() (p *linkProbe, err error) {
	p = &linkProbe{b: b}
	defer func() {
		if err != nil {
			_ = p.free()
		}
	}()
	free, _, err := memInfo()
	if err != nil {
		return nil, err
	}
	p.n = min(linkProbeBytes, free/2) &^ (1<<20 - 1)
	if p.n < linkProbeMin {
		return nil, fmt.Errorf("only %d bytes of GPU memory are free, too little to measure (needs %d)", free, 2*linkProbeMin)
	}
	if p.host, err = hostAllocMapped(p.n + linkBox); err != nil {
		return nil, err
	}
	clear(unsafe.Slice((*byte)(p.host), p.n+linkBox))
	if p.hostDev, err = hostDevicePtr(p.host); err != nil {
		return nil, err
	}
	if p.dev, err = memAlloc(p.n + 64); err != nil {
		return nil, err
	}
	p.scratch = p.dev + uint64(p.n)
	_, greatest, err := priorityRange()
	if err != nil {
		return nil, err
	}
	if p.stream, err = streamCreate(greatest); err != nil {
		return nil, err
	}
	if p.answer, err = streamCreate(greatest); err != nil {
		return nil, err
	}
	if p.start, err = timedEventCreate(); err != nil {
		return nil, err
	}
	if p.stop, err = timedEventCreate(); err != nil {
		return nil, err
	}
	if p.read, err = b.mod.Function("moe_link_read"); err != nil {
		return nil, err
	}
	if p.publish, err = b.mod.Function("moe_publish_wait"); err != nil {
		return nil, err
	}
	return p, memset32Async(p.scratch, 0, 64/4, p.stream)
}

// free waits for the probe's streams and frees what it holds. Runs in do.
func (p *linkProbe) free() error {
	var first error
	keep := func(err error) {
		if err != nil && first == nil {
			first = err
		}
	}
	for _, s := range []uintptr{p.stream, p.answer} {
		if s != 0 {
			keep(streamSync(s))
			keep(streamDestroy(s))
		}
	}
	for _, e := range []uintptr{p.start, p.stop} {
		if e != 0 {
			keep(eventDestroy(e))
		}
	}
	if p.dev != 0 {
		keep(memFree(p.dev))
	}
	if p.host != nil {
		keep(hostFree(p.host))
	}
	*p = linkProbe{}
	return first
}

// bandwidth times run (which moves p.n bytes on p.stream) once to warm up,
// then linkRuns times, and returns the best rate in GB/s. Runs in do.
func (p *linkProbe) bandwidth(run func() error) (float64, error) {
	best := math.Inf(1)
	for i := 0; i <= linkRuns; i++ {
		if err := eventRecord(p.start, p.stream); err != nil {
			return 0, err
		}
		if err := run(); err != nil {
			return 0, err
		}
		if err := eventRecord(p.stop, p.stream); err != nil {
			return 0, err
		}
		if err := eventSync(p.stop); err != nil {
			return 0, err
		}
		ms, err := eventElapsed(p.start, p.stop)
		if err != nil {
			return 0, err
		}
		if i > 0 && ms > 0 {
			best = min(best, ms)
		}
	}
	if math.IsInf(best, 1) {
		return 0, fmt.Errorf("the events timed nothing")
	}
	return float64(p.n) / (best * 1e-3) / 1e9, nil
}

// reaction runs copy mode's handshake with nothing to copy once to warm
// up, then linkReactions times, and returns the median time the kernel
// waited, in µs. Runs in do.
func (p *linkProbe) reaction() (float64, error) {
	seq := (*uint32)(unsafe.Add(p.host, p.n))
	late := (*uint32)(unsafe.Add(p.host, p.n+4))
	waited := (*uint64)(unsafe.Add(p.host, p.n+8))
	counter, ready, waitAcc := p.scratch+4, p.scratch+8, p.scratch+16
	seqDev, lateDev, waitedDev := p.hostDev+uint64(p.n), p.hostDev+uint64(p.n)+4, p.hostDev+uint64(p.n)+8
	if err := streamSync(p.stream); err != nil { // the scratch is zeroed
		return 0, err
	}
	var us []float64
	var prev uint64
	for i := uint32(1); i <= linkReactions+1; i++ {
		if err := launch(p.publish, 1, 1, 32, p.stream,
			0, 0, p.hostDev, seqDev, counter, ready, uint64(linkReactionTimeout.Nanoseconds()), lateDev, waitAcc, waitedDev,
			0, 0, 0, 0, 0, 0, 0, 0, 0); err != nil { // no CPU hand-off
			return 0, fmt.Errorf("launching moe_publish_wait: %w", err)
		}
		t0 := time.Now()
		for n := 0; atomic.LoadUint32(seq) != i; n++ {
			if n&1023 == 1023 && time.Since(t0) > 2*linkReactionTimeout {
				break // answered below all the same, so that the kernel ends
			}
		}
		if err := memset32Async(ready, i, 1, p.answer); err != nil {
			return 0, err
		}
		if err := streamSync(p.stream); err != nil {
			return 0, err
		}
		if atomic.LoadUint32(seq) != i || atomic.LoadUint32(late) != 0 {
			return 0, fmt.Errorf("handshake %d was not answered within %v", i, linkReactionTimeout)
		}
		w := atomic.LoadUint64(waited)
		if i > 1 {
			us = append(us, float64(w-prev)/1e3)
		}
		prev = w
	}
	slices.Sort(us)
	return us[len(us)/2], nil
}
