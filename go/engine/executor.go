package engine

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync/atomic"
	"time"

	"github.com/moe-infinity/moe_infinity/go/backend"
	"github.com/moe-infinity/moe_infinity/go/dtype"
	"github.com/moe-infinity/moe_infinity/go/layout"
)

// The layer executor: one MoE layer, from its routing to its output, is
// planned here and nowhere else. The caller (the Python hook) hands over
// the layer's tensors and what it can or wants (LayerFlags); ChoosePath
// picks how the layer runs from the backend's capabilities, the model's
// experts and the call's shape; Layer runs that path and says which it
// was. A path that needs the caller's own expert code (transformers' code
// on slot views) comes back to the caller with the experts it needs,
// already traced.
//
// A new way for experts to run (CPU compute of misses, dequantizing
// kernels) is a new Path, a capability in backend.Capabilities, a case in
// ChoosePath and one in Layer: the caller needs no change unless the new
// path hands work back to it.

// Path is how the executor ran (or will run) one MoE layer. The values
// cross the C ABI as MOE_PATH_* (capi/moe_infinity.h); they never change.
type Path int32

const (
	// PathMapped: the backend's kernels computed the layer reading every
	// expert where it is (its slot when resident, pinned host memory
	// otherwise); the routing reaches the tracer asynchronously. Nothing
	// waits for the host, so the layer can be captured in a CUDA graph.
	PathMapped Path = 1
	// PathKernels: the routing (on the host) was traced, the experts made
	// resident in slots (copies), and the kernels computed the layer.
	PathKernels Path = 2
	// PathHostStream: the routing was traced; the caller computes the
	// layer with its own expert code on slot views, acquiring the needed
	// experts one at a time (any number of them fits one slot).
	PathHostStream Path = 3
	// PathHostStacked: the routing was traced; the caller computes the
	// layer with its batched expert code on the needed experts stacked.
	PathHostStacked Path = 4
	// PathNeedRouting: nothing ran; call again with the routing in host
	// memory (LayerArgs.TopKHost).
	PathNeedRouting Path = 5
)

// numPaths bounds the Path values (for per-path counters).
const numPaths = 6

var pathNames = map[Path]string{
	PathMapped: "mapped", PathKernels: "kernels", PathHostStream: "host-stream",
	PathHostStacked: "host-stacked", PathNeedRouting: "need-routing",
}

// String names the path ("mapped", "kernels", ...).
func (p Path) String() string {
	if s, ok := pathNames[p]; ok {
		return s
	}
	return fmt.Sprintf("Path(%d)", int32(p))
}

// LayerFlags say what the caller can do or asks for. They are facts about
// the caller, never a choice between paths. Values cross the C ABI as
// MOE_LAYER_*.
type LayerFlags uint32

const (
	// LayerNoMapped: the caller turned mapped mode off, or records every
	// layer's host routing (which mapped mode never brings to it).
	LayerNoMapped LayerFlags = 1 << 0
	// LayerNoKernels: the caller asked for its own expert code everywhere.
	LayerNoKernels LayerFlags = 1 << 1
	// LayerHostBatched: the caller's expert code is batched (grouped GEMMs
	// over the needed experts stacked), not a loop over experts.
	LayerHostBatched LayerFlags = 1 << 2
	// LayerRoutingGaps: the host routing has empty places, RoutingGap,
	// where the router sent a token to fewer than k experts (capacity
	// dropping, as in SwitchTransformers and NLLB-MoE). The kernels read
	// every place as an expert, so such a layer runs the caller's code.
	LayerRoutingGaps LayerFlags = 1 << 3
	// LayerRowwise: each token is a different request's row, stacked into
	// one call, and must come out as that request's token alone would (a
	// serving batch that keeps every request exact). The path is chosen
	// as for one token: the kernels compute each (token, expert) pair on
	// its own, so a row's numbers do not depend on its neighbours, while
	// the caller's grouped code, chosen for more tokens, would group them.
	LayerRowwise LayerFlags = 1 << 4
)

// RoutingGap is the id of an empty place in a routing passed with
// LayerRoutingGaps.
const RoutingGap = -1

// Kernel crossover. The fused kernels are GEMVs over each (token, expert)
// pair, made for decode: they read an expert's weights once per pair, so
// they win while few tokens share an expert. Measured on an H200
// (BENCHMARKS.md, "kernel vs torch"): 2.6× faster than torch for one token
// on Mixtral-sized experts but slower at 4 tokens, and 15–23× faster for
// fine-grained experts (≤ 16 MiB) up to 4 tokens. Larger batches run the
// caller's code on slot views.
const (
	// KernelMaxTokens is the most tokens a kernel path takes.
	KernelMaxTokens = 16
	// KernelSmallExpertBytes is the expert size (bytes, as stored) up to
	// which the kernels beat the caller's code for more than one token.
	KernelSmallExpertBytes = 16 << 20
)

// KernelWins reports whether the fused kernels beat the caller's expert
// code for a layer call of tokens tokens over experts of expertBytes, by
// the default crossover (the constants above).
func KernelWins(tokens, expertBytes int64) bool {
	if tokens <= 1 {
		return true
	}
	return tokens <= KernelMaxTokens && expertBytes <= KernelSmallExpertBytes
}

// ExecutorPlan.KernelCrossover values: where the kernel crossover comes
// from.
const (
	// CrossoverDefault: KernelWins's constants.
	CrossoverDefault = "default"
	// CrossoverMeasured: the caller timed the kernels against its own
	// expert code on this machine and this model's experts, and gave the
	// most tokens for which the kernels won (Tuning.KernelMaxTokens).
	CrossoverMeasured = "measured"
)

// KernelWins is the package's KernelWins by the plan's crossover: with a
// measured one (KernelCrossover CrossoverMeasured) the kernels take calls
// of up to KernelMaxTokens tokens, whatever the experts' size (it was
// measured on this model's).
func (p ExecutorPlan) KernelWins(tokens, expertBytes int64) bool {
	if p.KernelCrossover == CrossoverMeasured {
		return tokens <= max(p.KernelMaxTokens, 1)
	}
	return KernelWins(tokens, expertBytes)
}

// ExecutorPlan is what the executor can do for a configured model on its
// backend, reported in the plan (Plan.Executor) and in moe_stats().
type ExecutorPlan struct {
	// Kernels: the backend's fused expert kernels serve this model's
	// experts (a kernel backend, and Setup.FFN "swiglu" with
	// bfloat16/float16 or FP8 gate_up_proj [2I, H] and down_proj [H, I],
	// or "gpt_oss" with bfloat16/float16 or MXFP4 experts: layout
	// GptOssKernel).
	Kernels bool `json:"kernels"`
	// KernelsOff says why Kernels is false ("" when true).
	KernelsOff string `json:"kernels_off,omitempty"`
	// Mapped: mapped mode is available (Kernels and a mapped backend).
	Mapped bool `json:"mapped"`
	// DType is the kernels' activation type (dtype.BF16 or dtype.F16;
	// dtype.Invalid without kernels): the caller's activations must match
	// it. Its JSON "dtype" is the C ABI's code (ActivationCode: 0 bfloat16,
	// 1 float16, -1 without kernels).
	DType dtype.DType `json:"-"`
	// Hidden and Inter are the FFN sizes the kernels work with (0 without
	// kernels); the caller sizes the scratch buffer as T·K·Inter float32.
	Hidden int64 `json:"hidden"`
	Inter  int64 `json:"inter"`
	// MaxMappedPairs is the most (token, expert) pairs a mapped call takes.
	MaxMappedPairs int64 `json:"max_mapped_pairs"`
	// KernelMaxTokens and KernelSmallExpertBytes are the kernel crossover
	// (see KernelWins): the most tokens a kernel call takes, and the
	// expert size (bytes) up to which it takes more than one.
	KernelMaxTokens        int64 `json:"kernel_max_tokens"`
	KernelSmallExpertBytes int64 `json:"kernel_small_expert_bytes"`
	// KernelCrossover says where they come from: CrossoverDefault, or
	// CrossoverMeasured (given by Tuning.KernelMaxTokens, from the
	// caller's timing of the kernels against its own code; then
	// KernelSmallExpertBytes is this model's expert size).
	KernelCrossover string `json:"kernel_crossover"`
	// Hybrid: on the kernels' path, the executor chooses per missed
	// expert between a slot and the CPU (ChooseMisses; cpu_experts).
	Hybrid bool `json:"hybrid"`
	// HybridOff says why Hybrid is false ("" when true).
	HybridOff string `json:"hybrid_off,omitempty"`
	// HybridCosts is the cost model the choices rest on (nil without
	// Hybrid).
	HybridCosts *HybridCosts `json:"hybrid_costs,omitempty"`
	// CPUThreads is the number of threads the CPU computes experts on
	// (cpu_experts: the host's cores for "auto" on a device backend, or
	// the count given, or the count Tune set); 0 where hybrid execution
	// was not set up.
	CPUThreads int `json:"cpu_threads,omitempty"`
	// GraphHandOff: hybrid execution also serves CUDA-graph replays in
	// copy mode (graph_misses "copy"): each captured layer publishes its
	// activations and routing weights, and the copy driver has the CPU
	// compute some of its misses (graphhandoff.go).
	GraphHandOff bool `json:"graph_hand_off"`
	// GraphHandOffOff says why GraphHandOff is false ("" when true).
	GraphHandOffOff string `json:"graph_hand_off_off,omitempty"`
	// Quant is the quant_method of experts the kernels compute straight
	// from their compressed bytes ("fp8", "mxfp4"): in slots and, in mapped
	// mode, in host memory; "" for bfloat16/float16 ones. The hybrid CPU
	// hand-off does not read quantized experts (off with it).
	Quant string `json:"quant,omitempty"`
}

// MarshalJSON writes p with DType as the C ABI's code ("dtype":
// ActivationCode), which the caller passes back with its activations.
func (p ExecutorPlan) MarshalJSON() ([]byte, error) {
	type fields ExecutorPlan // without this method
	return json.Marshal(struct {
		fields
		DType int32 `json:"dtype"`
	}{fields(p), ActivationCode(p.DType)})
}

// executorPlan works out the ExecutorPlan at Configure, for setup s.
func (e *Engine) executorPlan(s Setup) ExecutorPlan {
	caps := e.be.Capabilities()
	ffn := s.FFN
	p := ExecutorPlan{KernelMaxTokens: KernelMaxTokens, KernelSmallExpertBytes: KernelSmallExpertBytes, KernelCrossover: CrossoverDefault}
	e.setKernelLayout(s)
	switch {
	case !caps.ExpertKernels:
		p.KernelsOff = fmt.Sprintf("the %s backend computes experts with the caller's code", e.be.Name())
	case ffn != "swiglu" && ffn != "gpt_oss":
		p.KernelsOff = "the model's experts are not standard SwiGLU experts (setup ffn)"
	case !caps.Computes(ffn):
		p.KernelsOff = fmt.Sprintf("the %s backend's kernels do not compute %s experts (setup ffn)", e.be.Name(), ffn)
	case ffn == "gpt_oss" && e.cfg.Backend != "cpu" && !e.cfg.quantizedKernels(ffn, quantMethod(e.vw)):
		// Opt-in until the gpt-oss kernels' speed has been measured on a GPU.
		p.KernelsOff = fmt.Sprintf("gpt-oss experts run the caller's code on the %s backend unless the engine option quantized_kernels asks for the gpt-oss kernels (their speed is not yet measured on a GPU)", e.be.Name())
	default:
		hidden, inter, dt, err := e.ffnShape()
		if err != nil {
			p.KernelsOff = err.Error()
			break
		}
		if e.ft.Kernels == nil {
			p.KernelsOff = fmt.Sprintf("backend %s reports kernels but has none", e.be.Name())
			break
		}
		if e.vw != nil {
			if e.cfg.Backend != "cpu" && !e.cfg.quantizedKernels(ffn, e.vw.Method) {
				p.KernelsOff = fmt.Sprintf("the experts are quantized (%s): the caller's code computes them on views the %s backend dequantizes (the engine option quantized_kernels true computes FP8 and MXFP4 experts with the kernels instead)", e.vw.Method, e.be.Name())
				break
			}
			if !caps.ReadsQuant(e.vw.Method) {
				p.KernelsOff = fmt.Sprintf("the experts are quantized (%s) and the %s backend's kernels do not read that format", e.vw.Method, e.be.Name())
				break
			}
			p.Quant = e.vw.Method
		}
		p.Kernels, p.DType, p.Hidden, p.Inter = true, dt, hidden, inter
	}
	// The backend's kernels read in place whatever formats they read from
	// slots (backend.Capabilities.QuantFormats), for every kind of experts
	// they compute (gpt-oss's with their biases and scales).
	if p.Kernels && caps.Mapped && e.ft.Mapped != nil {
		p.Mapped, p.MaxMappedPairs = true, caps.MaxMappedPairs
	}
	return p
}

// PathInputs is everything ChoosePath looks at.
type PathInputs struct {
	// Exec is what the executor can do for the model (the plan's).
	Exec ExecutorPlan
	// MappedOff: mapped mode failed to start earlier (Exec.Mapped stays
	// as planned; this is what was found since).
	MappedOff bool
	// Flags are the caller's.
	Flags LayerFlags
	// Tokens, K: the call's routing shape; ExpertBytes one expert's size
	// as stored (the layout's source bytes).
	Tokens, K, ExpertBytes int64
	// DType is the activations' type (dtype.Invalid for one the kernels
	// do not take); WeightsOK whether the routing weights' type is one the
	// kernels read.
	DType     dtype.DType
	WeightsOK bool
	// HostRouting: the routing is in host memory. Needed and MaxPin (with
	// it): the layer's distinct experts, and how many experts can be
	// pinned at once.
	HostRouting    bool
	Needed, MaxPin int
}

// ChoosePath decides how one MoE layer runs. It is a pure function of its
// inputs so that every branch is tested on any machine (executor_test.go)
// with the capabilities of any backend.
func ChoosePath(in PathInputs) Path {
	kernels := in.Exec.Kernels && in.Flags&(LayerNoKernels|LayerRoutingGaps) == 0
	tokens := in.Tokens
	if in.Flags&LayerRowwise != 0 {
		tokens = 1 // each row as alone
	}
	kernelCall := kernels && in.DType != dtype.Invalid && in.DType == in.Exec.DType && in.WeightsOK && in.Exec.KernelWins(tokens, in.ExpertBytes)
	if kernelCall && in.Exec.Mapped && !in.MappedOff && in.Flags&LayerNoMapped == 0 && in.Tokens*in.K <= in.Exec.MaxMappedPairs {
		return PathMapped
	}
	if !in.HostRouting {
		return PathNeedRouting
	}
	if kernelCall && in.Needed <= in.MaxPin {
		return PathKernels
	}
	// With the kernels on (the GPU, where outputs are not bitwise those of
	// the caller's code anyway) the caller's per-expert code runs on slot
	// views rather than stacking the layer's experts into a copy the
	// memory budget does not cover.
	if in.Flags&LayerHostBatched != 0 && !kernels {
		return PathHostStacked
	}
	return PathHostStream
}

// LayerArgs is one call of the executor.
type LayerArgs struct {
	// FFNCall holds the layer, stream, tensor addresses (X, Out, Scratch,
	// TopK, Weights: device for the CUDA backend, host for the CPU one),
	// T, K, DType (dtype.Invalid when not a kernel type) and WDType
	// (dtype.Invalid when not one the kernels read).
	FFNCall
	// Reqs are the requests the tokens belong to (split evenly in row
	// order).
	Reqs []uint64
	// TopKHost is the [T, K] routing in host memory, or nil when it is
	// only on the device.
	TopKHost []int64
	// Flags are the caller's.
	Flags LayerFlags
	// Partial is the caller's [T, Hidden] float32 buffer (kernel memory,
	// like X) for the host paths' CPU part (hybrid execution: see
	// hostPartial); 0 when the caller offers none.
	Partial uint64
}

// LayerResult is what Layer did.
type LayerResult struct {
	// Path is the path taken.
	Path Path
	// Experts are the distinct experts of the layer the caller's code
	// computes, ascending (for the host paths; nil otherwise): all of
	// them but CPUExperts.
	Experts []int32
	// CPUExperts are the host paths' experts the CPU computed into
	// LayerArgs.Partial, ascending: the caller's code skips their pairs
	// and adds the partial. nil when the CPU computed none.
	CPUExperts []int32
}

// Layer runs one MoE layer on the path ChoosePath picks, and returns it.
// Host paths come back traced, with the experts the caller's code needs.
func (e *Engine) Layer(a LayerArgs) (LayerResult, error) {
	if err := e.readyLocked(); err != nil {
		return LayerResult{}, err
	}
	if a.T <= 0 || a.K <= 0 {
		return LayerResult{}, fmt.Errorf("%w: tokens %d, k %d: both must be > 0", ErrInvalid, a.T, a.K)
	}
	if a.TopKHost != nil && int64(len(a.TopKHost)) != a.T*a.K {
		return LayerResult{}, fmt.Errorf("%w: routing of %d ids for %d tokens × %d experts", ErrInvalid, len(a.TopKHost), a.T, a.K)
	}
	in := PathInputs{
		Exec: e.plan.Executor, MappedOff: e.mappedOff.Load(), Flags: a.Flags,
		Tokens: a.T, K: a.K, ExpertBytes: e.lay.SourceBytes,
		DType: a.DType, WeightsOK: backend.IsRoutingWeightsDType(a.WDType),
		HostRouting: a.TopKHost != nil, MaxPin: e.MaxPin(),
	}
	var experts []int32
	var counts [][]float32
	if a.TopKHost != nil {
		var err error
		if experts, counts, err = e.routingCounts(a.Layer, a.TopKHost, a.K, a.Reqs, a.Flags&LayerRoutingGaps != 0); err != nil {
			return LayerResult{}, err
		}
		in.Needed = len(experts)
	}
	path := ChoosePath(in)
	if path != PathMapped {
		e.pathCalls[path].Add(1)
	}
	switch path {
	case PathMapped:
		err := e.LayerMapped(a.FFNCall, a.Reqs)
		if err == nil || !errors.Is(err, errMappedUnavailable) {
			e.pathCalls[path].Add(1)
			return LayerResult{Path: path}, err
		}
		// Mapped mode cannot start for this model (some expert is not
		// readable in place): the other paths serve every later call.
		e.mappedOff.Store(true)
		e.noteMappedOff(err)
		return e.Layer(a)
	case PathKernels:
		a.FFNCall.Experts = experts
		return LayerResult{Path: path}, e.layerKernels(a.FFNCall, a.Reqs, a.TopKHost, counts, a.Flags&LayerRowwise == 0)
	case PathHostStream, PathHostStacked:
		if len(a.Reqs) > 0 {
			t0 := time.Now()
			if err := e.observe(a.Layer, a.Reqs, counts, true); err != nil {
				return LayerResult{}, err
			}
			e.phase(phaseObserve, t0)
		}
		r := LayerResult{Path: path, Experts: experts}
		if e.hostHybridOK(a) {
			c := a.FFNCall
			c.Experts = experts
			if pick := e.chooseCPU(c, a.Reqs, a.TopKHost); len(pick.experts) > 0 {
				dev := withoutExperts(experts, pick.experts)
				if err := e.hostPartial(c, pick, dev, a.TopKHost, a.Partial); err != nil {
					return LayerResult{}, err
				}
				r.Experts, r.CPUExperts = dev, pick.experts
			}
		}
		return r, nil
	}
	return LayerResult{Path: path}, nil
}

// hostHybridOK says whether the CPU may compute some of a host-path call's
// experts (hostPartial): hybrid execution is on, the caller offered a
// partial output and passed the kernels' arguments (activations of the
// experts' type, routing weights of a type the hand-off reads), asks for
// no code of its own everywhere, has no routing gaps, and is not a
// row-wise batch (a row must come out as it would alone, and which
// experts the CPU takes depends on the whole call; the kernels' path
// keeps row-wise calls off the CPU too, layerKernels).
func (e *Engine) hostHybridOK(a LayerArgs) bool {
	x := e.plan.Executor
	return a.Partial != 0 && a.X != 0 && a.Weights != 0 && x.Kernels && e.hybridOn() &&
		a.Flags&(LayerNoKernels|LayerRoutingGaps|LayerRowwise) == 0 &&
		a.DType != dtype.Invalid && a.DType == x.DType && backend.IsRoutingWeightsDType(a.WDType)
}

// withoutExperts is experts less those in drop, in experts' order.
func withoutExperts(experts, drop []int32) []int32 {
	out := make([]int32, 0, len(experts))
	for _, x := range experts {
		if !slices.Contains(drop, x) {
			out = append(out, x)
		}
	}
	return out
}

// errMappedUnavailable marks LayerMapped's failure to start mapped mode
// (as opposed to a failure of the call).
var errMappedUnavailable = errors.New("mapped mode unavailable")

// mappedOffNote is the first reason mapped mode could not start, for
// moe_stats().
type mappedOffNote struct{ reason atomic.Pointer[string] }

func (e *Engine) noteMappedOff(err error) {
	s := err.Error()
	e.mappedOffWhy.reason.CompareAndSwap(nil, &s)
}

// quantMethod is the quant_method vw serves ("" for nil: unquantized
// experts).
func quantMethod(vw *layout.Views) string {
	if vw == nil {
		return ""
	}
	return vw.Method
}
