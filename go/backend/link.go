package backend

// LinkRates are the rates of a host→device link that the engine's choices
// between moving an expert and reading it where it lies rest on (copy
// mode against in-place reads, the CPU/GPU cost model). They differ from
// host to host (zero-copy reads ran at 33 GB/s on one H100 host against 52
// by DMA, and at 49–51 against 53 on others), so they are measured on the
// machine, not assumed.
type LinkRates struct {
	// DMAGBps is the copy engine's bandwidth from pinned host memory to
	// the device, in GB/s (1e9 bytes a second).
	DMAGBps float64 `json:"dma_gbps"`
	// ZeroCopyGBps is the kernels' bandwidth reading pinned host memory in
	// place, in GB/s.
	ZeroCopyGBps float64 `json:"zero_copy_gbps"`
	// ReactionUs is how long a captured layer waits, in µs, for the engine
	// to react to its routing and issue its first copy (copy mode's fixed
	// cost per layer).
	ReactionUs float64 `json:"reaction_us"`
}

// LinkMeter is implemented by backends with a host→device link (CUDA) that
// can measure it. The CPU backend has no such link and does not implement
// it: the engine then has no rates unless the user gives them.
type LinkMeter interface {
	// MeasureLink measures the link's rates on the opened backend, in
	// well under a second (the CUDA backend moves ~0.5 GB, meant to take
	// under 0.2 s). The link should be idle (the engine calls it once, in
	// Configure, before any copy): copies in flight would share it and
	// lower the figures.
	MeasureLink() (LinkRates, error)
}
