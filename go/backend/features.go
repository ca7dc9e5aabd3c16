package backend

// Features are a backend's optional parts, found once by FeaturesOf, so
// that the engine asks one struct what a backend can do instead of
// asserting its type at every use. A nil field: the backend has no such
// part. Capabilities says how well the parts it has serve (whether the
// kernels are the fast path, the mapped calls' limits, the quantized
// formats the kernels read).
type Features struct {
	// Kernels computes experts with fused FFN kernels (ffn.go).
	Kernels Kernels
	// Mapped reads non-resident experts in place from host memory.
	Mapped Mapped
	// Graphs captures and replays decode steps as CUDA graphs.
	Graphs Graphs
	// CopyGraphs serves captured layers' misses by the copy engine.
	CopyGraphs CopyGraphs
	// CopyHandOff hands captured layers' misses to the CPU inside a
	// replay (hybrid execution in CUDA graphs).
	CopyHandOff CopyHandOff
	// Ordered orders loads and pins on streams.
	Ordered Ordered
	// Timed reports the backend's own timings.
	Timed Timed
	// LinkMeter measures the host→device link.
	LinkMeter LinkMeter
	// Views holds quantized experts' dequantized views.
	Views ViewMemory
	// HandOff shares a layer's experts between the kernels and the CPU
	// (hybrid execution).
	HandOff HandOff
}

// FeaturesOf resolves b's optional interfaces: the one place the engine's
// backend is type-asserted.
func FeaturesOf(b Backend) Features {
	var f Features
	f.Kernels, _ = b.(Kernels)
	f.Mapped, _ = b.(Mapped)
	f.Graphs, _ = b.(Graphs)
	f.CopyGraphs, _ = b.(CopyGraphs)
	f.CopyHandOff, _ = b.(CopyHandOff)
	f.Ordered, _ = b.(Ordered)
	f.Timed, _ = b.(Timed)
	f.LinkMeter, _ = b.(LinkMeter)
	f.Views, _ = b.(ViewMemory)
	f.HandOff, _ = b.(HandOff)
	return f
}
