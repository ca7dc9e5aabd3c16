package backend

import "unsafe"

// HandOff is implemented by backends whose kernels can share a MoE layer
// with the CPU (hybrid execution: the engine computes some of the layer's
// experts on the CPU from host memory while the others come over the
// link). One hand-off of a layer call is
//
//	HandOut → (the CPU computes its experts) → HandBack → kernels → HandDone
//
// HandOut brings the layer's activations and routing weights to the host,
// HandBack returns the CPU's partial output (float32 [T, Hidden], the sum
// over the pairs it computed) to where the kernels read it, and the
// kernels add it to their own sum (FFNArgs.Addend). The caller runs one
// hand-off at a time (the buffers are the backend's, reused by the next).
type HandOff interface {
	// HandOut makes xBytes of activations at x and wBytes of routing
	// weights at w (kernel addresses: device memory on a GPU) readable by
	// the CPU, in stream order after the work queued on stream, and waits
	// until they are. It returns their host addresses and partialBytes of
	// host memory for the CPU's partial output, valid until the next
	// HandOut. It first waits for the previous hand-off's kernels
	// (HandDone) to be done with the buffers.
	HandOut(stream uintptr, x uint64, xBytes int64, w uint64, wBytes int64, partialBytes int64) (HostWork, error)
	// HandBack makes the partial output the CPU wrote to HostWork.Partial
	// readable by kernels on stream, in stream order (without waiting),
	// and returns its kernel address for FFNArgs.Addend. With into = 0 it
	// is the backend's buffer; otherwise it is into, kernel memory of the
	// caller's of HandOut's partialBytes (the host paths' partial output,
	// which the caller's own code adds), which HandBack fills.
	HandBack(stream uintptr, into uint64) (addend uint64, err error)
	// HandDone says that the kernels reading the addend are queued on
	// stream: the next HandOut reuses the buffers only after they ran.
	HandDone(stream uintptr) error
	// HandOffFixedUs estimates one hand-off's fixed cost, in µs, on a link
	// of rates r: the time a layer call that computes anything on the CPU
	// spends on handing the work over and back, whatever its size (the
	// cost model's HybridCosts.HandOffFixedUs).
	HandOffFixedUs(r LinkRates) float64
}

// HostWork are the host addresses of one hand-off (HandOff.HandOut).
type HostWork struct {
	// X is the activations, Weights the routing weights, as the kernels
	// hold them (same types and layout).
	X, Weights uint64
	// Partial is the host memory the CPU writes its partial output to.
	Partial uint64
}

// The CPU backend's hand-off is trivial: its kernels' memory is host
// memory already, so HandOut returns x and w as they are and HandBack the
// partial output where the CPU wrote it; nothing is copied or waited for.

// HandOut returns x and w as they are and a host buffer of partialBytes
// (the backend's, reused by the next HandOut).
func (c *CPU) HandOut(_ uintptr, x uint64, _ int64, w uint64, _ int64, partialBytes int64) (HostWork, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := (partialBytes + 3) / 4
	if int64(len(c.partial)) < n {
		c.partial = make([]float32, n)
	}
	c.partialN = n
	var p uint64
	if n > 0 {
		p = uint64(uintptr(unsafe.Pointer(&c.partial[0])))
	}
	return HostWork{X: x, Weights: w, Partial: p}, nil
}

// HandBack returns the partial output's address (the CPU backend's
// kernels read host memory), or copies it into into (host memory) and
// returns into.
func (c *CPU) HandBack(_ uintptr, into uint64) (uint64, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.partialN == 0 {
		return into, nil
	}
	if into != 0 {
		copy(unsafe.Slice((*float32)(HostPtr(into)), c.partialN), c.partial[:c.partialN])
		return into, nil
	}
	return uint64(uintptr(unsafe.Pointer(&c.partial[0]))), nil
}

// HandDone does nothing: the CPU backend's kernels have run when FFN
// returns.
func (c *CPU) HandDone(uintptr) error { return nil }

// HandOffFixedUs is 0: the CPU backend copies nothing to hand work over.
func (c *CPU) HandOffFixedUs(LinkRates) float64 { return 0 }
