package engine

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"runtime"
	"strconv"
	"strings"

	"github.com/moe-infinity/moe_infinity/go/backend"
	"github.com/moe-infinity/moe_infinity/go/cache"
	"github.com/moe-infinity/moe_infinity/go/layout"
	"github.com/moe-infinity/moe_infinity/go/strictjson"
)

// Error categories. Every error the engine returns wraps at most one of
// these so that the C ABI can map it to a status code.
var (
	// ErrInvalid marks bad arguments (unknown layer, malformed JSON, ...).
	ErrInvalid = errors.New("invalid argument")
	// ErrState marks calls made in the wrong order (acquire before
	// configure, configure twice, ...).
	ErrState = errors.New("invalid state")
	// ErrBudget marks a device-memory budget too small for the request.
	ErrBudget = errors.New("insufficient budget")
	// ErrClosed marks calls on a closed engine.
	ErrClosed = errors.New("engine is closed")
	// ErrUnsupported marks features the backend or build does not have.
	ErrUnsupported = errors.New("unsupported")
)

// Config holds the engine's settings. The zero value of every field picks
// the documented default.
type Config struct {
	// BudgetBytes is the device memory for the expert cache, in bytes
	// (required, > 0).
	BudgetBytes int64 `json:"budget_bytes"`
	// Policy is the eviction policy: "priority" (default), "lru", "lfu"
	// (cache.Policies; exact names, see nameSetting).
	Policy string `json:"policy"`
	// Prefetch enables trace-driven prefetching and router hints. A nil
	// pointer in JSON (field absent) means true.
	Prefetch *bool `json:"prefetch,omitempty"`
	// EAMCCapacity is the number of request EAMs kept (default 1000).
	EAMCCapacity int `json:"eamc_capacity"`
	// Matches is the number of most similar stored EAMs summed to predict
	// (default 4).
	Matches int `json:"matches"`
	// PrefetchWindow is the maximum number of prefetch loads in flight
	// (default 2; on-demand loads are not limited).
	PrefetchWindow int `json:"prefetch_window"`
	// PrefetchConfidence: an expert is prefetched from an EAM prediction
	// only when predicted at least this many times as likely as a uniform
	// guess (default 2; negative turns the filter off). Router hints are
	// always prefetched.
	PrefetchConfidence float64 `json:"prefetch_confidence"`
	// PrefetchMinEvidence: a layer's EAM prediction is used only when it
	// rests on at least this many routed tokens in the matched requests
	// (default 64; negative turns the filter off).
	PrefetchMinEvidence float64 `json:"prefetch_min_evidence"`
	// PrefetchMinTokenShare: an expert is prefetched only when predicted
	// to serve at least this fraction of its layer's tokens (see
	// prefetch.Planner.MinTokenShare). 0 = default
	// (prefetch.DefaultMinTokenShare), < 0 = off.
	PrefetchMinTokenShare float64 `json:"prefetch_min_token_share"`
	// Workers is the number of copy workers of the CPU backend (default
	// min(4, GOMAXPROCS)).
	Workers int `json:"workers"`
	// TracePath, when set, is loaded at Configure (if it exists and fits
	// the model) and written at Close.
	TracePath string `json:"trace_path"`
	// Backend selects the device tier: "cpu" (default) or "cuda" (CUDA
	// build only); Backends.
	Backend string `json:"backend"`
	// Device is the CUDA device ordinal for the cuda backend.
	Device int `json:"device"`
	// MaxSlots caps the number of slots (0 = as many as the budget holds,
	// but never more than the model has experts).
	MaxSlots int `json:"max_slots"`
	// AdmitMargin is how much more (as a fraction) the eviction policy
	// must value a missed expert than its best victim for mapped mode to
	// copy it in (cache.Admit); >= 0, nil = DefaultAdmitMargin. LRU
	// ignores it.
	AdmitMargin *float64 `json:"admit_margin,omitempty"`
	// GraphMisses is how the layers of a captured CUDA-graph step get
	// their missed experts: "read" (the kernels read them in place from
	// pinned host memory, over PCIe, and the cache admits some afterwards),
	// "copy" (each layer hands its routing to the engine inside the replay
	// and waits while the copy engine brings its misses into slots) or
	// "auto" (default: "copy" when an expert is at least CopyMissesFrom
	// bytes, "read" otherwise). It takes effect at the next capture.
	GraphMisses string `json:"graph_misses"`
	// ReferenceKernels makes the CPU backend offer its reference expert FFN
	// and mapped mode to the layer executor, as a GPU backend offers its
	// kernels: the CPU oracle of the GPU paths, for tests. Off by default,
	// where transformers' code computes every layer (bitwise parity).
	ReferenceKernels bool `json:"reference_kernels"`
	// QuantizedKernels chooses how a GPU backend computes quantized
	// experts (FP8 block-scaled, MXFP4) and gpt-oss experts (Setup.FFN
	// "gpt_oss", bfloat16/float16 or MXFP4). true: with its expert
	// kernels straight from the compressed slots, decode layers in mapped
	// mode (and CUDA graphs) as bfloat16 experts. false: with the caller's
	// code (transformers') on dequantized views, which the backend fills
	// from the compressed slots in device memory (backend.ViewMemory), so
	// the link still carries the compressed bytes. nil (left out or null,
	// the default): per kind, the kernels where they have beaten the
	// views on a GPU (quantizedKernels): FP8 SwiGLU experts, whose kernels
	// agree with transformers' dequantizing load on an H100 and decoded
	// the Qwen3-30B-A3B shape at 0.49× bfloat16 experts' s/token there
	// (CUDA graphs, 2026-12-07); gpt-oss experts keep the caller's code
	// until their kernels' speed has been measured on a GPU.
	// On the CPU backend the reference kernels compute FP8 and gpt-oss
	// experts whenever ReferenceKernels is on; this setting does not
	// matter there.
	QuantizedKernels *bool `json:"quantized_kernels,omitempty"`
	// CPUExperts turns on the CPU's part in computing experts. JSON:
	// "auto" (the default, also when left out), "off" or a thread count
	// from 1 to MaxCPUExpertThreads.
	//
	// With a GPU backend, "auto" is on with one thread per core but
	// HostThreadsReserved (at least one): the layer
	// executor may compute a missed expert on the CPU where it lies
	// instead of bringing it over the link (ChooseMisses). On the CPU
	// backend "auto" is off, so that transformers' code computes every
	// layer and outputs stay bitwise those of transformers; a thread count
	// turns it on there: the CPU backend computes standard SwiGLU experts
	// (bfloat16/float16, Setup.FFN "swiglu") with its SIMD kernels (package
	// cpuffn), the executor runs decode layers on PathKernels, and
	// ChooseMisses decides per missed expert between copying it into a
	// slot and computing it from host memory, then offered to the cache
	// like an in-place read (the CPU backend standing in for a device, so
	// that CPU tests exercise every decision). Mapped mode stays off unless ReferenceKernels.
	CPUExperts CPUExperts `json:"cpu_experts"`
	// LinkRates are rates of this machine's host→device link, given: the
	// engine's choices rest on them (see LinkRates) and nothing is
	// measured. nil (left out or null): the engine measures them at
	// Configure when the backend can (backend.LinkMeter, the CUDA backend)
	// and MeasureLink is on; without rates GraphMisses "auto" falls back to
	// the expert size (CopyMissesFrom).
	LinkRates *LinkRates `json:"link_rates,omitempty"`
	// MeasureLink lets Configure measure the link when LinkRates are not
	// given (~0.5 GB over the link, meant to take under 0.2 s, and 64 MiB
	// of device and of pinned host memory for its duration). Default
	// false (nil in JSON, left out or null, means false): the measurement
	// ran on H100 and H200 hosts (DMA 53–55 GB/s, zero copy 51, reaction
	// 4–5 µs), but its reaction leaves out the host's first copy call
	// (45–70 µs in decode), so with measured rates "auto" copies
	// Qwen3-sized experts, which read in place decoded 10% faster on one
	// H100 (BENCHMARKS.md, "Hybrid decode"). Off, "auto" decides by
	// expert size.
	MeasureLink *bool `json:"measure_link,omitempty"`
	// KernelBuild names the build of the CUDA backend's kernels
	// (KernelBuilds): "sm80" (the default; PTX for sm_80, which runs on
	// A100, H100 and later; FP8 weights decoded in software) or "sm89"
	// (PTX ISA 7.8 for devices of compute capability 8.9 and higher: Ada,
	// Hopper; the FP8 kernels decode weights with the hardware's e4m3
	// conversion, every other kernel is the same). Both builds compute the
	// same bits. "sm89" is opt-in until a GPU run has checked it: the code
	// is compiled and its decode checked on the CPU, but it has not run on
	// a GPU. On an older device Configure fails with ErrUnsupported naming
	// the device's compute capability. Backends without GPU kernels (cpu)
	// ignore it; Plan.KernelBuild says which build was loaded.
	KernelBuild string `json:"kernel_build"`
	// ModelLink makes the CPU backend stand in for a device's link: each
	// copy into a slot takes as long as LinkRates says a copy takes
	// (reaction_us, plus the slot's bytes at dma_gbps), one copy at a time
	// (backend.LinkModel). For measuring on a machine without a GPU what
	// the engine's link-bound choices do to time; the CPU's own work is
	// not slowed. Needs LinkRates; the CPU backend only.
	ModelLink bool `json:"model_link"`
}

// CPUExperts is Config.CPUExperts: CPUExpertsAuto (the zero value, the
// default), CPUExpertsOff, or a thread count > 0.
type CPUExperts int

const (
	// CPUExpertsAuto: on with a GPU backend (one thread per core), off on
	// the CPU backend (see Config.CPUExperts).
	CPUExpertsAuto CPUExperts = 0
	// CPUExpertsOff: the CPU computes no expert (on the CPU backend,
	// transformers' code computes them).
	CPUExpertsOff CPUExperts = -1
	// MaxCPUExpertThreads bounds a thread count given as a number.
	MaxCPUExpertThreads = 1024
)

// cpuExpertsSetting lists CPUExperts' names (the first is the default); a
// number is the other form.
var cpuExpertsSetting = nameSetting{"cpu_experts", "CPU expert mode (or a thread count)", []string{"auto", "off"}}

// UnmarshalJSON takes "off", "auto" (exact names, see nameSetting) or an
// integer thread count from 1 to MaxCPUExpertThreads.
func (c *CPUExperts) UnmarshalJSON(b []byte) error {
	s := strings.TrimSpace(string(b))
	switch {
	case s == "null":
		return cpuExpertsSetting.invalid(nil)
	case strings.HasPrefix(s, `"`):
		var name string
		if err := json.Unmarshal(b, &name); err != nil {
			return fmt.Errorf("%w: cpu_experts: %v", ErrInvalid, err)
		}
		name, err := cpuExpertsSetting.parse(name, true)
		if err != nil {
			return err
		}
		*c = CPUExpertsAuto
		if name == "off" {
			*c = CPUExpertsOff
		}
		return nil
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 1 || n > MaxCPUExpertThreads {
		return fmt.Errorf("%w: cpu_experts: %s is neither \"off\", \"auto\" nor a thread count from 1 to %d", ErrInvalid, s, MaxCPUExpertThreads)
	}
	*c = CPUExperts(n)
	return nil
}

// check fails for a value other than auto, off or a thread count from 1
// to MaxCPUExpertThreads.
func (c CPUExperts) check() error {
	if c < CPUExpertsOff || c > MaxCPUExpertThreads {
		return fmt.Errorf("%w: cpu_experts must be auto (0), off (-1) or a thread count from 1 to %d (got %d)", ErrInvalid, MaxCPUExpertThreads, int(c))
	}
	return nil
}

// MarshalJSON writes the form UnmarshalJSON reads.
func (c CPUExperts) MarshalJSON() ([]byte, error) {
	switch {
	case c == CPUExpertsAuto:
		return []byte(`"auto"`), nil
	case c < 0:
		return []byte(`"off"`), nil
	}
	return []byte(strconv.Itoa(int(c))), nil
}

// HostThreadsReserved is how many cores "auto" leaves to the engine's own
// threads, which must run while the CPU computes a layer's experts: the
// caller's thread (it hands the layer out, waits and launches the
// kernels) and the device's thread (every CUDA call and the link's copies
// go through it). With every core given to the experts' FFN the two wait
// for a scheduler slice: on an H200 host (16 cores) the eager path's
// acquire and kernel phases grew by 3 ms a token each beside 16 FFN
// threads, and 12–14 threads decoded as fast as 16 or faster in graph
// mode (BENCHMARKS.md, "Hybrid decode").
const HostThreadsReserved = 2

// Threads is the number of threads c gives the CPU's expert computation
// with the named backend (Config.Backend): 0 (off), the number of cores
// less HostThreadsReserved, at least 1 ("auto" with a GPU backend), 0
// ("auto" on the CPU backend) or the count.
func (c CPUExperts) Threads(backend string) int {
	switch {
	case c == CPUExpertsAuto && backend != "cpu":
		return autoThreads(runtime.NumCPU())
	case c == CPUExpertsAuto:
		return 0
	}
	return max(int(c), 0)
}

// autoThreads is "auto"'s thread count on a host of cores cores.
func autoThreads(cores int) int { return max(cores-HostThreadsReserved, 1) }

// quantizedKernels says whether a GPU backend computes experts of kind
// ffn (Setup.FFN), quantized as method ("" when not), with its kernels
// (Config.QuantizedKernels; nil: FP8 SwiGLU experts only).
func (c Config) quantizedKernels(ffn, method string) bool {
	if c.QuantizedKernels != nil {
		return *c.QuantizedKernels
	}
	return ffn == "swiglu" && method == "fp8"
}

// LinkRates are the rates of the host→device link that the engine's
// choices rest on: GraphMisses "auto" (ChooseGraphMisses) and the hybrid
// cost model (HybridCosts' link figures). The fields are
// backend.LinkRates' (dma_gbps, zero_copy_gbps, reaction_us): given by the
// user (Config.LinkRates) or measured by the backend at Configure
// (backend.LinkMeter; Plan.LinkRatesSource says which).
type LinkRates backend.LinkRates

// check validates rates, given or measured.
func (r *LinkRates) check() error {
	ok := func(v float64) bool { return !math.IsNaN(v) && !math.IsInf(v, 0) }
	if r.DMAGBps <= 0 || r.ZeroCopyGBps <= 0 || r.ReactionUs < 0 || !ok(r.DMAGBps) || !ok(r.ZeroCopyGBps) || !ok(r.ReactionUs) {
		return fmt.Errorf("%w: link_rates needs dma_gbps > 0, zero_copy_gbps > 0 and reaction_us >= 0, all finite (got %+v)", ErrInvalid, *r)
	}
	return nil
}

// ChooseGraphMisses is GraphMisses "auto" for experts of expertBytes
// bytes: "copy" when bringing a missed expert in by the copy engine
// (reaction + bytes at the DMA rate) takes less time than the kernels
// reading it in place (bytes at the zero-copy rate), "read" otherwise, or
// when the backend has no copy mode. Without rates (neither given nor
// measured) it copies from CopyMissesFrom bytes.
func ChooseGraphMisses(expertBytes int64, rates *LinkRates, copyMode bool) string {
	if !copyMode {
		return "read"
	}
	if rates == nil {
		if expertBytes >= CopyMissesFrom {
			return "copy"
		}
		return "read"
	}
	b := float64(expertBytes)
	read := b / (rates.ZeroCopyGBps * 1e9)
	cp := rates.ReactionUs*1e-6 + b/(rates.DMAGBps*1e9)
	if cp < read {
		return "copy"
	}
	return "read"
}

// CopyMissesFrom is the expert size, in bytes, from which GraphMisses
// "auto" copies misses when the link was not measured: from there on a copy's fixed cost (the layer
// waits ~10-30 µs for the engine to react to its routing and issue the
// copies) is below the ~8% that in-place reads lose to the copy engine
// (H100: 50.6 against 54.7 GB/s), while smaller experts, which a token
// uses many of per layer, are cheaper read in place.
const CopyMissesFrom = 32 << 20

// GraphMissesModes lists the accepted Config.GraphMisses names; the first
// is the default.
var GraphMissesModes = []string{"auto", "read", "copy"}

// Backends lists the accepted Config.Backend names; the first is the
// default. "cuda" works only in the CUDA build of the engine.
var Backends = []string{"cpu", "cuda"}

// KernelBuilds lists the accepted Config.KernelBuild names; the first is
// the default. They are the CUDA backend's (cuda.KernelBuilds; a test
// keeps the two lists equal without the CPU build linking the kernels).
var KernelBuilds = []string{"sm80", "sm89"}

// FFNKinds lists the accepted Setup.FFN names; the first is the default
// (the caller's code computes the experts).
var FFNKinds = []string{"none", "swiglu", "gpt_oss"}

// A nameSetting is a setting whose value is one name from a fixed list.
// Every such setting follows one rule, applied by parse: a name is
// accepted only spelled exactly as listed (lowercase, no surrounding
// whitespace), and "" is not a name. A setting left out takes the first
// name, the default.
type nameSetting struct {
	key   string   // the JSON name, which errors name
	what  string   // what the name selects, for errors
	names []string // accepted names; names[0] is the default
}

var (
	policySetting      = nameSetting{"policy", "cache policy", cache.Policies}
	graphMissesSetting = nameSetting{"graph_misses", "graph-miss mode", GraphMissesModes}
	backendSetting     = nameSetting{"backend", "backend", Backends}
	ffnSetting         = nameSetting{"ffn", "expert computation", FFNKinds}
	kernelBuildSetting = nameSetting{"kernel_build", "kernel build", KernelBuilds}
)

// parse returns s if it is one of the names. set says whether the setting
// was given: an unset one is the default, a set "" is an error.
func (n nameSetting) parse(s string, set bool) (string, error) {
	if !set && s == "" {
		return n.names[0], nil
	}
	for _, name := range n.names {
		if s == name {
			return s, nil
		}
	}
	return "", n.invalid(&s)
}

// invalid is the error for a value that is not a name (nil: null).
func (n nameSetting) invalid(s *string) error {
	got, hint := "null", ""
	if s != nil {
		got = strconv.Quote(*s)
		for _, name := range n.names {
			if *s != name && strings.ToLower(strings.TrimSpace(*s)) == name {
				hint = "; names are exact: lowercase, without spaces"
			}
		}
	}
	return fmt.Errorf("%w: %s: unknown %s %s (supported: %s%s)", ErrInvalid, n.key, n.what, got, strings.Join(n.names, ", "), hint)
}

// nameValue is one name setting of a Config or Tuning and where its value
// is.
type nameValue struct {
	setting nameSetting
	value   *string
}

// names lists c's name settings.
func (c *Config) names() []nameValue {
	return []nameValue{{policySetting, &c.Policy}, {graphMissesSetting, &c.GraphMisses}, {backendSetting, &c.Backend}, {kernelBuildSetting, &c.KernelBuild}}
}

// checkGiven rejects a name setting that b (valid JSON, already decoded
// into the values) gives as "" or null, which a decoded struct cannot tell
// from a setting left out.
func checkGiven(b []byte, names []nameValue) error {
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(b, &raw); err != nil {
		return fmt.Errorf("%w: %v", ErrInvalid, err) // unreachable after strictjson.Decode
	}
	for _, nv := range names {
		r, ok := raw[nv.setting.key]
		switch {
		case !ok:
		case string(r) == "null":
			return nv.setting.invalid(nil)
		case nv.value == nil || *nv.value == "":
			empty := ""
			return nv.setting.invalid(&empty)
		}
	}
	return nil
}

// DefaultAdmitMargin is the default Config.AdmitMargin: a missed expert is
// copied in when the policy values it at least twice its victim. Chosen on
// trace replays (BENCHMARKS.md, "Admission in mapped mode"): against no
// margin it cuts link traffic by 8-23% at the same hit rate (±0.5 points).
const DefaultAdmitMargin = 1.0

// ParseConfig decodes a JSON config (one object, keys spelled exactly as
// the json tags, nothing after it: strictjson.Decode), and fills in
// defaults. The name settings (policy, graph_misses, backend,
// kernel_build) take exact
// lowercase names; "" and null are errors, a left-out setting is the
// default.
func ParseConfig(b []byte) (Config, error) {
	var c Config
	if err := strictjson.Decode(b, &c); err != nil {
		return Config{}, fmt.Errorf("%w: engine config: %v", ErrInvalid, err)
	}
	if err := checkGiven(b, c.names()); err != nil {
		return Config{}, err
	}
	return c.withDefaults()
}

func (c Config) withDefaults() (Config, error) {
	if c.BudgetBytes <= 0 {
		return c, fmt.Errorf("%w: budget_bytes must be > 0 (got %d)", ErrInvalid, c.BudgetBytes)
	}
	for _, nv := range c.names() {
		v, err := nv.setting.parse(*nv.value, *nv.value != "")
		if err != nil {
			return c, err
		}
		*nv.value = v
	}
	if c.AdmitMargin == nil {
		m := DefaultAdmitMargin
		c.AdmitMargin = &m
	}
	if c.Prefetch == nil {
		t := true
		c.Prefetch = &t
	}
	if c.MeasureLink == nil {
		f := false
		c.MeasureLink = &f
	}
	if c.EAMCCapacity == 0 {
		c.EAMCCapacity = 1000
	}
	if c.Matches == 0 {
		c.Matches = 4
	}
	if c.PrefetchWindow == 0 {
		c.PrefetchWindow = 2
	}
	cpuErr := c.CPUExperts.check()
	switch {
	case c.EAMCCapacity < 1:
		return c, fmt.Errorf("%w: eamc_capacity must be >= 1 (got %d)", ErrInvalid, c.EAMCCapacity)
	case c.Matches < 1:
		return c, fmt.Errorf("%w: matches must be >= 1 (got %d)", ErrInvalid, c.Matches)
	case c.PrefetchWindow < 1:
		return c, fmt.Errorf("%w: prefetch_window must be >= 1 (got %d)", ErrInvalid, c.PrefetchWindow)
	case c.Workers < 0:
		return c, fmt.Errorf("%w: workers must be >= 0 (got %d)", ErrInvalid, c.Workers)
	case *c.AdmitMargin < 0 || math.IsNaN(*c.AdmitMargin) || math.IsInf(*c.AdmitMargin, 0):
		return c, fmt.Errorf("%w: admit_margin must be a finite number >= 0 (got %v)", ErrInvalid, *c.AdmitMargin)
	case cpuErr != nil:
		return c, cpuErr
	case c.MaxSlots < 0:
		return c, fmt.Errorf("%w: max_slots must be >= 0 (got %d)", ErrInvalid, c.MaxSlots)
	}
	if c.LinkRates != nil {
		if err := c.LinkRates.check(); err != nil {
			return c, err
		}
	}
	if c.ModelLink && c.LinkRates == nil {
		return c, fmt.Errorf("%w: model_link needs link_rates: the rates of the link the CPU backend is to stand in for", ErrInvalid)
	}
	if c.ModelLink && c.Backend != "cpu" {
		return c, fmt.Errorf("%w: model_link is for the cpu backend (it stands in for a device's link); the %s backend has a link of its own", ErrInvalid, c.Backend)
	}
	return c, nil
}

// Setup is the second configuration step, made once the checkpoint is
// known: which MoE modules run in which order, and the slot image.
type Setup struct {
	// Layers lists MoE module prefixes (as the store names them) in
	// execution order; empty means every discovered module in natural
	// order.
	Layers []string `json:"layers"`
	// Layout is the slot image.
	Layout layout.Spec `json:"layout"`
	// BudgetBytes, when > 0, replaces Config.BudgetBytes (the caller may
	// only know the budget left for experts once the dense weights are
	// placed).
	BudgetBytes int64 `json:"budget_bytes,omitempty"`
	// FFN names the experts' computation when it is one the backend's
	// kernels implement: "swiglu" (down · (silu(gate · x) ⊙ (up · x)), no
	// biases, gate rows before up rows in gate_up_proj). "none" (the
	// default, also when left out) means the caller's own expert code
	// computes every layer. "gpt_oss": gpt-oss's experts (transformers'
	// GptOssExperts; backend.GptOssArgs): transposed matrices with
	// interleaved gate and up columns, biases, and a clamped activation
	// with SwigluAlpha and SwigluLimit.
	FFN string `json:"ffn,omitempty"`
	// SwigluAlpha and SwigluLimit are gpt-oss's activation constants
	// (config.swiglu_alpha and config.swiglu_limit; FFN "gpt_oss" only).
	// Left out: the releases' 1.702 and 7.0.
	SwigluAlpha *float64 `json:"swiglu_alpha,omitempty"`
	SwigluLimit *float64 `json:"swiglu_limit,omitempty"`
}

// GptOssAlpha and GptOssLimit are the gpt-oss releases' activation
// constants (Setup.SwigluAlpha and SwigluLimit when left out).
const (
	GptOssAlpha = 1.702
	GptOssLimit = 7.0
)

// ParseSetup decodes a JSON Setup (one object, keys spelled exactly as the
// json tags, nothing after it: strictjson.Decode).
func ParseSetup(b []byte) (Setup, error) {
	var s Setup
	if err := strictjson.Decode(b, &s); err != nil {
		return Setup{}, fmt.Errorf("%w: engine setup: %v", ErrInvalid, err)
	}
	ffn, err := ffnSetting.parse(s.FFN, false)
	if err != nil {
		return Setup{}, err
	}
	s.FFN = ffn
	if (s.SwigluAlpha != nil || s.SwigluLimit != nil) && ffn != "gpt_oss" {
		return Setup{}, fmt.Errorf("%w: engine setup: swiglu_alpha and swiglu_limit are gpt-oss's constants (ffn \"gpt_oss\"), not ffn %q's", ErrInvalid, ffn)
	}
	if a := s.SwigluAlpha; a != nil && (math.IsNaN(*a) || math.IsInf(*a, 0)) {
		return Setup{}, fmt.Errorf("%w: engine setup: swiglu_alpha %g must be finite", ErrInvalid, *a)
	}
	if l := s.SwigluLimit; l != nil && !(*l > 0 && !math.IsInf(*l, 0)) {
		return Setup{}, fmt.Errorf("%w: engine setup: swiglu_limit %g must be positive and finite", ErrInvalid, *l)
	}
	return s, nil
}

// Plan is what Configure decided.
type Plan struct {
	// Backend is the backend's name.
	Backend string `json:"backend"`
	// Layers are the MoE module prefixes in execution order.
	Layers []string `json:"layers"`
	// NumExperts is the number of routed experts per layer.
	NumExperts int `json:"num_experts"`
	// Slots is the number of cache slots.
	Slots int `json:"slots"`
	// SlotBytes is the size of one slot in bytes.
	SlotBytes int64 `json:"slot_bytes"`
	// ArenaBytes is Slots × SlotBytes.
	ArenaBytes int64 `json:"arena_bytes"`
	// Layout is the image the caller's expert code reads: the slot image,
	// or for quantized experts the dequantized views' (Views).
	Layout *layout.Layout `json:"layout"`
	// Stored is the slot image when it differs from Layout: quantized
	// experts as the checkpoint stores them (nil otherwise).
	Stored *layout.Layout `json:"stored,omitempty"`
	// Views are the buffers Acquire's indices name (the slots themselves
	// for unquantized experts).
	Views ViewsPlan `json:"views"`
	// Policy is the eviction policy in use.
	Policy string `json:"policy"`
	// Prefetch reports whether prefetching is on.
	Prefetch bool `json:"prefetch"`
	// GraphMisses is how captured steps will get their misses: "read" or
	// "copy" (Config.GraphMisses with "auto" resolved).
	GraphMisses string `json:"graph_misses"`
	// TraceLoaded is the number of EAMs loaded from TracePath.
	TraceLoaded int `json:"trace_loaded"`
	// Executor is what the layer executor can do with this model on this
	// backend (moe_layer chooses among these per call).
	Executor ExecutorPlan `json:"executor"`
	// LinkRates are the link rates the engine's choices rest on
	// (GraphMisses "auto", the hybrid cost model); nil when there are none
	// (the expert size decided).
	LinkRates *LinkRates `json:"link_rates,omitempty"`
	// KernelBuild is the build of GPU kernels the backend loaded ("sm80"
	// or "sm89", Config.KernelBuild), or "none" for a backend without GPU
	// kernels (cpu).
	KernelBuild string `json:"kernel_build"`
	// LinkRatesSource says where LinkRates came from: "given"
	// (Config.LinkRates), "measured" (by the backend at Configure),
	// "failed" (the measurement failed: LinkRates is nil and Warnings says
	// why) or "none" (not given, and the backend has no link to measure or
	// Config.MeasureLink is off). LinkSources lists them.
	LinkRatesSource string `json:"link_rates_source"`
	// Warnings are non-fatal problems (for example a trace file for
	// another model, which was ignored).
	Warnings []string `json:"warnings"`
}

// FormatBytes renders n bytes with a binary unit ("1.50 GiB").
func FormatBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit && exp < 4; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.2f %ciB", float64(n)/float64(div), "KMGTP"[exp])
}
