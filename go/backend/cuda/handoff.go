//go:build cuda

package cuda

import (
	"fmt"
	"sync"
	"unsafe"

	"github.com/moe-infinity/moe_infinity/go/backend"
)

// The eager CUDA hand-off of hybrid execution (backend.HandOff): the
// layer's activations and routing weights come to pinned host memory by
// an asynchronous device→host copy on the layer's stream and one wait for
// it; the CPU's partial output goes back by a host→device copy on the same
// stream into device memory, which moe_down adds (FFNArgs.Addend). The
// buffers grow to the largest call and are reused: HandDone records an
// event after the kernels that read the addend, and the next HandOut waits
// for it before it writes them again.
//
// It waits on the host once per hand-off, so it serves eager layer calls,
// not CUDA-graph replays (docs/ARCHITECTURE.md sketches the host-free
// version inside copy mode's handshake).

// handOff is the hand-off's memory and events (guarded by mu).
type handOff struct {
	mu        sync.Mutex
	host      unsafe.Pointer // pinned: x, then the routing weights, then the partial output
	hostBytes int64
	xOff      int64 // offsets in host of the weights and the partial output
	wOff      int64
	pOff      int64
	pBytes    int64
	dev       uint64 // device copy of the partial output
	devBytes  int64
	ready     uintptr // recorded after the device→host copies; the host waits on it
	done      uintptr // recorded by HandDone after the kernels reading dev
	pending   bool    // done has been recorded since the last HandOut
}

// align64 rounds n up to a multiple of 64 bytes.
func align64(n int64) int64 { return (n + 63) &^ 63 }

// HandOut copies x and w to pinned host memory on stream and waits for
// them; see backend.HandOff.
func (b *Backend) HandOut(stream uintptr, x uint64, xBytes int64, w uint64, wBytes int64, partialBytes int64) (backend.HostWork, error) {
	if xBytes <= 0 || wBytes <= 0 || partialBytes <= 0 {
		return backend.HostWork{}, fmt.Errorf("backend cuda: hand-off of %d, %d and %d bytes", xBytes, wBytes, partialBytes)
	}
	h := &b.hand
	h.mu.Lock()
	defer h.mu.Unlock()
	var out backend.HostWork
	err := b.dev.do(func() error {
		if h.pending {
			// The previous hand-off's upload and the kernels that read it.
			if err := eventSync(h.done); err != nil {
				return err
			}
			h.pending = false
		}
		if h.ready == 0 {
			var err error
			if h.ready, err = blockingEventCreate(); err != nil {
				return err
			}
			if h.done, err = eventCreate(); err != nil {
				return err
			}
		}
		need := align64(xBytes) + align64(wBytes) + align64(partialBytes)
		if need > h.hostBytes {
			if h.host != nil {
				if err := hostFree(h.host); err != nil {
					return err
				}
				h.host, h.hostBytes = nil, 0
			}
			p, err := hostAlloc(need)
			if err != nil {
				return err
			}
			h.host, h.hostBytes = p, need
		}
		if partialBytes > h.devBytes {
			if h.dev != 0 {
				if err := memFree(h.dev); err != nil {
					return err
				}
				h.dev, h.devBytes = 0, 0
			}
			d, err := memAlloc(partialBytes)
			if err != nil {
				return err
			}
			h.dev, h.devBytes = d, partialBytes
		}
		h.xOff, h.wOff, h.pOff, h.pBytes = 0, align64(xBytes), align64(xBytes)+align64(wBytes), partialBytes
		if err := copyDtoHAsync(unsafe.Add(h.host, h.xOff), x, xBytes, stream); err != nil {
			return err
		}
		if err := copyDtoHAsync(unsafe.Add(h.host, h.wOff), w, wBytes, stream); err != nil {
			return err
		}
		if err := eventRecord(h.ready, stream); err != nil {
			return err
		}
		return eventSync(h.ready)
	})
	if err != nil {
		return out, fmt.Errorf("backend cuda: handing a layer to the CPU: %w", err)
	}
	base := uint64(uintptr(h.host))
	return backend.HostWork{X: base + uint64(h.xOff), Weights: base + uint64(h.wOff), Partial: base + uint64(h.pOff)}, nil
}

// HandBack uploads the partial output on stream (from pinned memory, so
// the host does not wait) into the hand-off's device buffer, or into into
// (the caller's device memory of the partial's size), and returns its
// device address. HandDone's event then follows the upload, so the next
// HandOut reuses the pinned buffer only after it ran.
func (b *Backend) HandBack(stream uintptr, into uint64) (uint64, error) {
	h := &b.hand
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.host == nil || h.dev == 0 {
		return 0, fmt.Errorf("backend cuda: HandBack without HandOut")
	}
	dst := h.dev
	if into != 0 {
		dst = into
	}
	err := b.dev.do(func() error { return copyHtoD(dst, unsafe.Add(h.host, h.pOff), h.pBytes, stream) })
	if err != nil {
		return 0, fmt.Errorf("backend cuda: handing the CPU's partial output back: %w", err)
	}
	return dst, nil
}

// HandDone records an event after the kernels queued on stream; the next
// HandOut waits for it before reusing the buffers.
func (b *Backend) HandDone(stream uintptr) error {
	h := &b.hand
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.done == 0 {
		return nil
	}
	if err := b.dev.do(func() error { return eventRecord(h.done, stream) }); err != nil {
		return fmt.Errorf("backend cuda: %w", err)
	}
	h.pending = true
	return nil
}

// HandOffFixedUs estimates a hand-off's fixed cost as two of the link's
// reactions (r.ReactionUs): the activations' copy and the host's wait for
// it, then the partial output's upload, which the layer's kernels wait
// for. An estimate from the link's rates, not a measurement of the
// hand-off itself.
func (b *Backend) HandOffFixedUs(r backend.LinkRates) float64 { return 2 * r.ReactionUs }

// freeHandOff frees the hand-off's memory and events (inside do, at Close).
func (b *Backend) freeHandOff(keep func(error)) {
	h := &b.hand
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.pending {
		keep(eventSync(h.done))
		h.pending = false
	}
	for _, e := range []*uintptr{&h.ready, &h.done} {
		if *e != 0 {
			keep(eventDestroy(*e))
			*e = 0
		}
	}
	if h.host != nil {
		keep(hostFree(h.host))
		h.host, h.hostBytes = nil, 0
	}
	if h.dev != 0 {
		keep(memFree(h.dev))
		h.dev, h.devBytes = 0, 0
	}
}
