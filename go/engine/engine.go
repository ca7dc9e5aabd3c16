// Package engine ties the offloading pieces together. The data path of one
// MoE layer is:
//
//	router (in torch) → Observe: the tracer updates each request's EAM, the
//	prefetcher re-plans later layers → Acquire: the cache pins the layer's
//	experts (hit, wait for a prefetch in flight, or load now, preempting
//	prefetches) and returns their slots → compute on the slot views (torch
//	or an engine kernel) → Release: the pins are dropped.
//
// Meanwhile a dispatcher goroutine drains the prefetch queue into the
// backend, at most Config.PrefetchWindow loads at a time, each only into a
// slot whose expert is predicted less strongly than the one it brings in.
package engine

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/moe-infinity/moe_infinity/go/backend"
	"github.com/moe-infinity/moe_infinity/go/cache"
	"github.com/moe-infinity/moe_infinity/go/core"
	"github.com/moe-infinity/moe_infinity/go/dtype"
	"github.com/moe-infinity/moe_infinity/go/layout"
	"github.com/moe-infinity/moe_infinity/go/prefetch"
	"github.com/moe-infinity/moe_infinity/go/requant"
	"github.com/moe-infinity/moe_infinity/go/store"
	"github.com/moe-infinity/moe_infinity/go/trace"
)

// Engine is one offloading engine instance. All methods are safe for
// concurrent use.
type Engine struct {
	cfg  Config
	ckpt *store.Checkpoint
	// NewBackend creates the backend at Configure; tests may replace it
	// before Configure.
	NewBackend func(cfg Config) (backend.Backend, error)

	mu         sync.Mutex // guards configuration and close
	configured bool
	closed     bool
	plan       Plan
	mods       []*store.MoEModule
	lay        *layout.Layout
	views      *viewPool     // the dequantized views of quantized experts (nil otherwise)
	vw         *layout.Views // quantized experts: the slot and view images (nil otherwise)
	// kl is where the kernels find an expert's matrices (and FP8 scale
	// grids) in its slot, set with the kernels (ExecutorPlan.Kernels);
	// fp8, for FP8 experts, their block and up rows (tables unset; nil
	// otherwise).
	kl  backend.MappedLayout
	fp8 *backend.FP8Args
	// ffn is Setup.FFN. For gpt-oss experts ("gpt_oss"), gk is where the
	// kernels find an expert's matrices, biases (and MXFP4 scales) in its
	// slot and gptoss their activation's constants (tables unset); both
	// nil otherwise, or when the kernels cannot read the experts.
	ffn    string
	gk     *layout.GptOssKernel
	gptoss *backend.GptOssArgs
	be     backend.Backend
	ft     backend.Features // be's optional parts, resolved once at Configure
	// core sequences every layer's tracing, scoring, planning and cache
	// decisions (go/core, the code go/sim replays through); cache,
	// tracker, planner and queue are its parts.
	core     *core.Core
	cache    *cache.Cache
	tracker  *trace.Tracker
	planner  *prefetch.Planner
	queue    *prefetch.Queue
	layers   int
	experts  int
	files    [][]string // per layer: the mapped files its experts live in (checkLayer)
	allFiles []string   // the distinct files of every layer (GraphStep)

	stop     chan struct{}
	ops      sync.WaitGroup // Acquire calls in progress
	bg       sync.WaitGroup // dispatcher and prefetch completions
	freeLate bool           // Close ran with leases outstanding; the last Release frees
	prefSem  chan struct{}
	// admitWaiting counts the CPU's experts admitted to the cache whose
	// copies wait for a place in the prefetch window (useOnCPU).
	admitWaiting atomic.Int64
	leaseMu      sync.Mutex
	leases       map[uint64][]cache.Grant
	nextLeas     atomic.Uint64

	bytesMoved []atomic.Int64 // per layer
	stallNs    []atomic.Int64 // per layer

	tokensMu     sync.Mutex
	expertTokens []float64 // [layer*experts+expert] tokens observed since the last reset (under tokensMu)

	acquires atomic.Int64
	phaseNs  [numPhases]atomic.Int64
	opening  atomic.Pointer[backend.Backend] // the backend, from before Open (for Progress)
	// compressDone and compressTotal: AddCompressed's progress in source
	// bytes (for Progress).
	compressDone, compressTotal atomic.Int64
	compressed                  map[CompressRequest]requant.Result // AddCompressed's copies added (under mu)
	hostCompressed              map[string]HostCompressResult      // CompressHost's modules, by prefix (under mu)

	demandMu   sync.Mutex
	demand     int           // on-demand copies in flight
	demandIdle chan struct{} // closed when demand drops to 0

	mapped mappedState
	// mappedOff: mapped mode failed to start for this model; the executor
	// takes the other paths (the reason is in mappedOffWhy).
	mappedOff    atomic.Bool
	mappedOffWhy mappedOffNote
	// pathCalls counts Layer calls by Path (index: the Path value).
	pathCalls [numPaths]atomic.Int64

	// MeasureHybrid, when set before Configure, replaces the measurement
	// of the hybrid cost model (tests inject one; the link rates, given
	// or measured, still replace its link figures).
	MeasureHybrid func(hidden, inter int64, f16 bool) (HybridCosts, error)
	// rates are the link rates the engine's choices rest on (Plan.LinkRates:
	// given or measured at Configure; nil when neither). Set once by
	// configure.
	rates       *LinkRates
	hybrid      hybridState
	cpuComputed []atomic.Int64 // per layer: experts the CPU computed (layerHybrid)
	cpuNs       []atomic.Int64 // per layer: the CPU's time for them, ns
	missPlanNs  []atomic.Int64 // per layer: the cost model's time for the misses it planned, ns
}

// New creates an engine with an empty checkpoint.
func New(cfg Config) (*Engine, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	e := &Engine{cfg: cfg, ckpt: store.New(), leases: map[uint64][]cache.Grant{}, demandIdle: make(chan struct{})}
	e.NewBackend = defaultBackend
	return e, nil
}

func defaultBackend(cfg Config) (backend.Backend, error) {
	switch cfg.Backend {
	case "cpu":
		c := backend.NewCPU(cfg.Workers)
		c.ReferenceKernels = cfg.ReferenceKernels
		c.ExpertThreads = cfg.CPUExperts.Threads(cfg.Backend)
		if cfg.ModelLink {
			c.Link = backend.LinkModel{GBps: cfg.LinkRates.DMAGBps, Reaction: time.Duration(cfg.LinkRates.ReactionUs * float64(time.Microsecond))}
		}
		return c, nil
	}
	return newAcceleratorBackend(cfg)
}

// Config returns the engine's effective configuration.
func (e *Engine) Config() Config { return e.cfg }

func (e *Engine) checkOpen() error {
	if e.closed {
		return ErrClosed
	}
	return nil
}

// AddCheckpoint maps a checkpoint (directory, .safetensors file or index
// .json) into the engine's store.
func (e *Engine) AddCheckpoint(path string) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if err := e.checkOpen(); err != nil {
		return err
	}
	if e.configured {
		return fmt.Errorf("%w: add checkpoints before configure", ErrState)
	}
	return e.ckpt.AddPath(path)
}

// AddHostTensor registers a tensor that lives in caller-owned host memory;
// data must stay valid until Close.
func (e *Engine) AddHostTensor(name, dt string, shape []int64, data []byte) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if err := e.checkOpen(); err != nil {
		return err
	}
	if e.configured {
		return fmt.Errorf("%w: add tensors before configure", ErrState)
	}
	d, err := dtype.Parse(dt)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	return e.ckpt.AddHost(name, d, shape, data)
}

// ModuleInfo describes one discovered MoE module for the caller.
type ModuleInfo struct {
	Prefix     string     `json:"prefix"`
	NumExperts int        `json:"num_experts"`
	Fused      bool       `json:"fused"`
	Roles      []RoleInfo `json:"roles"`
}

// RoleInfo describes one per-expert tensor role.
type RoleInfo struct {
	Name   string  `json:"name"`
	DType  string  `json:"dtype"`
	Shape  []int64 `json:"shape"`
	Tensor string  `json:"tensor"` // expert 0's source tensor name
	Source string  `json:"source"` // the file holding it ("host" for registered tensors)
}

// Modules lists the MoE modules found in the store, in natural order.
func (e *Engine) Modules() ([]ModuleInfo, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if err := e.checkOpen(); err != nil {
		return nil, err
	}
	idx, err := e.ckpt.Experts()
	if err != nil {
		return nil, err
	}
	out := make([]ModuleInfo, 0, len(idx.Modules))
	for _, m := range idx.Modules {
		mi := ModuleInfo{Prefix: m.Prefix, NumExperts: m.NumExperts, Fused: m.Fused}
		for _, r := range m.Roles {
			p, err := m.Part(0, r)
			if err != nil {
				return nil, err
			}
			mi.Roles = append(mi.Roles, RoleInfo{Name: r, DType: p.DType.TorchName(), Shape: p.Shape, Tensor: p.Tensor, Source: p.Source})
		}
		out = append(out, mi)
	}
	return out, nil
}

// source adapts the layout and modules to backend.SegmentSource. Every
// read of the checkpoint's mapping runs under ckpt's guard, so a shard
// truncated under the mapping gives store.ErrCheckpointChanged, not SIGBUS.
type source struct {
	lay   *layout.Layout
	mods  []*store.MoEModule
	ckpt  *store.Checkpoint
	files [][]string // per layer: the mapped files its experts live in
}

func (s source) SlotBytes() int64 { return s.lay.SlotBytes }

func (s source) Shape() (int, int) { return len(s.mods), s.mods[0].NumExperts }

func (s source) Segments(l, x int) ([]backend.Segment, bool) {
	if l < 0 || l >= len(s.mods) {
		return nil, false
	}
	return s.lay.Segments(s.mods[l], x)
}

// Fill copies (and converts) the expert under the checkpoint's guard, then
// checks that the layer's files are unchanged: bytes read from a file
// rewritten in place with its size unchanged (no fault) are never served.
func (s source) Fill(l, x int, dst []byte) error {
	if l < 0 || l >= len(s.mods) {
		return fmt.Errorf("%w: layer %d out of range", ErrInvalid, l)
	}
	if err := s.ckpt.Guard(func() error { return s.lay.Fill(s.mods[l], x, dst) }); err != nil {
		return err
	}
	return s.ckpt.CheckFiles(s.files[l])
}

// Guard is the checkpoint's Guard: a fault names the file that changed.
func (s source) Guard(read func() error) error { return s.ckpt.Guard(read) }

// layerFiles lists, per module, the distinct mapped files its experts'
// parts live in (host tensors are left out).
func layerFiles(mods []*store.MoEModule) [][]string {
	out := make([][]string, len(mods))
	for l, m := range mods {
		seen := map[string]bool{}
		for x := 0; x < m.NumExperts; x++ {
			for _, r := range m.Roles {
				p, err := m.Part(x, r)
				if err != nil || p.Source == store.HostSource || seen[p.Source] {
					continue
				}
				seen[p.Source] = true
				out[l] = append(out[l], p.Source)
			}
		}
	}
	return out
}

func distinct(lists [][]string) []string {
	seen := map[string]bool{}
	var out []string
	for _, l := range lists {
		for _, f := range l {
			if !seen[f] {
				seen[f] = true
				out = append(out, f)
			}
		}
	}
	return out
}

// checkLayer checks, with one fstat per shard, that the files layer's
// experts live in have not changed on disk since they were loaded
// (store.ErrCheckpointChanged). Run before each layer's experts are used:
// a backend that reads them in place (mapped mode, or pages the GPU copies
// from) would otherwise serve bytes of another model, or fault.
func (e *Engine) checkLayer(layer int) error {
	return e.ckpt.CheckFiles(e.files[layer])
}

// Configure fixes the layer order and slot image, sizes the cache from the
// budget, opens the backend and loads the trace file. It is called once.
//
// With a backend that has a mapped mode and experts the FFN kernels take,
// mapped mode is turned on here, before any expert is loaded: its tables
// must know every resident expert, and an expert loaded before they
// existed would be read from host memory for as long as it stayed cached.
// (It used to be turned on by the first mapped layer, after a synchronous
// prefill had filled the cache: decode then missed on every expert the
// prefill had loaded.) A model mapped mode cannot serve keeps the reason,
// returned by LayerMapped.
func (e *Engine) Configure(s Setup) (Plan, error) {
	plan, err := e.configure(s)
	if err != nil {
		return plan, err
	}
	if e.ft.Mapped != nil {
		_, _ = e.enableMapped() // the error, if any, is kept for LayerMapped
	}
	return plan, nil
}

// moduleList resolves a setup's layer names (all of the checkpoint's MoE
// modules when empty) to their modules, checking that each exists once
// and that all have the same number of experts.
func (e *Engine) moduleList(layers []string) ([]string, []*store.MoEModule, error) {
	idx, err := e.ckpt.Experts()
	if err != nil {
		return nil, nil, err
	}
	if len(idx.Modules) == 0 {
		return nil, nil, fmt.Errorf("%w: no routed experts found (no tensor names match \"<prefix>.experts.<index>.<name>\" or fused \"<prefix>.experts.<name>\")", ErrInvalid)
	}
	names := layers
	if len(names) == 0 {
		for _, m := range idx.Modules {
			names = append(names, m.Prefix)
		}
	}
	mods := make([]*store.MoEModule, len(names))
	seen := map[string]bool{}
	for i, n := range names {
		m, ok := idx.Module(n)
		if !ok {
			return nil, nil, fmt.Errorf("%w: layer %d: no MoE module %q in the checkpoint", ErrInvalid, i, n)
		}
		if seen[n] {
			return nil, nil, fmt.Errorf("%w: MoE module %q listed twice", ErrInvalid, n)
		}
		seen[n] = true
		if i > 0 && m.NumExperts != mods[0].NumExperts {
			return nil, nil, fmt.Errorf("%w: module %q has %d experts but %q has %d; all MoE layers must have the same number",
				ErrInvalid, n, m.NumExperts, mods[0].Prefix, mods[0].NumExperts)
		}
		mods[i] = m
	}
	return names, mods, nil
}

// SlotPlan is the memory one expert takes in the cache, as Configure lays
// it out for a setup: what a caller sizes a memory budget with before
// configuring.
type SlotPlan struct {
	// SlotBytes is one slot's size in bytes (its regions aligned).
	SlotBytes int64 `json:"slot_bytes"`
	// Layout is the slot layout (for quantized experts, as stored).
	Layout *layout.Layout `json:"layout"`
	// ViewBytes is one dequantized view's size in bytes for quantized
	// experts (a budget holds at least one slot and one view), else 0.
	ViewBytes int64 `json:"view_bytes,omitempty"`
}

// SlotPlan returns the slot layout Configure would make for s (its
// layers and layout; the budget is not looked at), without configuring.
func (e *Engine) SlotPlan(s Setup) (SlotPlan, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if err := e.checkOpen(); err != nil {
		return SlotPlan{}, err
	}
	_, mods, err := e.moduleList(s.Layers)
	if err != nil {
		return SlotPlan{}, err
	}
	lay, vw, err := buildLayout(s.Layout, mods)
	if err != nil {
		return SlotPlan{}, err
	}
	p := SlotPlan{SlotBytes: lay.SlotBytes, Layout: lay}
	if vw != nil {
		p.ViewBytes = vw.Layout.SlotBytes
	}
	return p, nil
}

func (e *Engine) configure(s Setup) (Plan, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if err := e.checkOpen(); err != nil {
		return Plan{}, err
	}
	if e.configured {
		return Plan{}, fmt.Errorf("%w: engine already configured", ErrState)
	}
	names, mods, err := e.moduleList(s.Layers)
	if err != nil {
		return Plan{}, err
	}
	lay, vw, err := buildLayout(s.Layout, mods)
	if err != nil {
		return Plan{}, err
	}
	L, E := len(mods), mods[0].NumExperts
	if s.BudgetBytes < 0 {
		return Plan{}, fmt.Errorf("%w: budget_bytes must be > 0 (got %d)", ErrInvalid, s.BudgetBytes)
	}
	if s.BudgetBytes > 0 {
		e.cfg.BudgetBytes = s.BudgetBytes
	}
	nViews, slotBudget, err := viewBudget(vw, lay.SlotBytes, e.cfg.BudgetBytes, L*E)
	if err != nil {
		return Plan{}, err
	}
	slots64 := slotBudget / lay.SlotBytes
	if slots64 < 1 {
		return Plan{}, fmt.Errorf("%w: a device-memory budget of %s (%d bytes) holds no expert: one expert slot needs %s (%d bytes); raise device_memory to at least %d bytes",
			ErrBudget, FormatBytes(e.cfg.BudgetBytes), e.cfg.BudgetBytes, FormatBytes(lay.SlotBytes), lay.SlotBytes, lay.SlotBytes)
	}
	slots := int(min(slots64, int64(L*E)))
	if e.cfg.MaxSlots > 0 {
		slots = min(slots, e.cfg.MaxSlots)
	}

	plan := Plan{
		Layers: names, NumExperts: E, Slots: slots, SlotBytes: lay.SlotBytes,
		ArenaBytes: int64(slots) * lay.SlotBytes, Layout: lay, Policy: e.cfg.Policy,
		Prefetch: *e.cfg.Prefetch, Warnings: []string{},
		Views: ViewsPlan{Count: slots, Bytes: lay.SlotBytes},
	}
	if vw != nil {
		plan.Layout, plan.Stored = vw.Layout, lay
		plan.Views = ViewsPlan{Count: min(nViews, slots), Bytes: vw.Layout.SlotBytes, Dequant: vw.Method}
	}
	coll, loaded, warn := loadTrace(e.cfg, L, E)
	if warn != "" {
		plan.Warnings = append(plan.Warnings, warn)
	}
	plan.TraceLoaded = loaded

	pol, _ := cache.ParsePolicy(e.cfg.Policy)
	e.layers, e.experts = L, E
	e.expertTokens = make([]float64, L*e.experts)
	cr, err := core.New(core.Config{
		Slots: slots, Policy: pol, Collection: coll, Matches: e.cfg.Matches,
		Confidence: e.cfg.PrefetchConfidence, MinEvidence: e.cfg.PrefetchMinEvidence, MinTokenShare: e.cfg.PrefetchMinTokenShare,
		Prefetch: *e.cfg.Prefetch, Observed: e.countTokens,
	})
	if err != nil {
		return Plan{}, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	c := cr.Cache()
	be, err := e.NewBackend(e.cfg)
	if err != nil {
		return Plan{}, err
	}
	e.opening.Store(&be)
	files := layerFiles(mods)
	if err := be.Open(slots, lay.SlotBytes, source{lay: lay, mods: mods, ckpt: e.ckpt, files: files}); err != nil {
		if errors.Is(err, store.ErrCheckpointChanged) {
			return Plan{}, err
		}
		if errors.Is(err, backend.ErrUnsupported) { // e.g. kernel_build "sm89" on an older GPU
			return Plan{}, fmt.Errorf("%w: %v", ErrUnsupported, err)
		}
		return Plan{}, fmt.Errorf("%w: %v", ErrBudget, err)
	}
	if vw != nil && plan.Views.Count > 0 {
		if e.views, err = newViewPool(vw, plan.Views.Count, be); err != nil {
			_ = be.Close()
			return Plan{}, err
		}
	}
	e.files, e.allFiles = files, distinct(files)
	plan.Backend = be.Name()
	plan.KernelBuild = be.Capabilities().KernelBuild
	if plan.KernelBuild == "" {
		plan.KernelBuild = "none"
	}
	e.mods, e.lay, e.be, e.ft, e.cache, e.vw = mods, lay, be, backend.FeaturesOf(be), c, vw
	// Measured here, before any copy uses the link; the hybrid cost model
	// (setupHybrid) and graph_misses "auto" read them.
	var linkWarn string
	e.rates, plan.LinkRatesSource, linkWarn = linkRates(e.cfg, e.ft.LinkMeter, be.Name())
	plan.LinkRates = e.rates
	if linkWarn != "" {
		plan.Warnings = append(plan.Warnings, linkWarn)
	}
	e.ffn = s.FFN
	plan.Executor = e.executorPlan(s)
	if err := e.setupHybrid(&plan.Executor); err != nil {
		_ = be.Close()
		return Plan{}, err
	}
	e.planGraphHandOff(&plan.Executor)
	e.core, e.tracker, e.planner, e.queue = cr, cr.Tracker(), cr.Planner(), cr.Queue()
	e.bytesMoved = make([]atomic.Int64, L)
	e.stallNs = make([]atomic.Int64, L)
	e.cpuComputed = make([]atomic.Int64, L)
	e.cpuNs = make([]atomic.Int64, L)
	e.missPlanNs = make([]atomic.Int64, L)
	e.stop = make(chan struct{})
	e.prefSem = make(chan struct{}, e.cfg.PrefetchWindow)
	e.bg.Add(1)
	go e.dispatch()
	plan.GraphMisses = e.resolveGraphMisses()
	e.plan = plan
	e.configured = true
	return plan, nil
}

// loadTrace returns the EAM collection to start with: the trace file's when
// it exists and fits (L, E), otherwise an empty one and a warning.
func loadTrace(cfg Config, L, E int) (*trace.Collection, int, string) {
	empty := func() *trace.Collection {
		c, _ := trace.NewCollection(L, E, cfg.EAMCCapacity)
		return c
	}
	if cfg.TracePath == "" {
		return empty(), 0, ""
	}
	coll, err := trace.LoadFile(cfg.TracePath)
	if errors.Is(err, os.ErrNotExist) {
		return empty(), 0, ""
	}
	if err != nil {
		return empty(), 0, fmt.Sprintf("trace file %s ignored: %v", cfg.TracePath, err)
	}
	if err := coll.CheckShape(L, E); err != nil {
		return empty(), 0, fmt.Sprintf("trace file %s ignored: it was recorded for another model: %v", cfg.TracePath, err)
	}
	// WithCapacity keeps the record of which EAMs came from the file, so
	// that saving at Close merges instead of counting them twice.
	out, err := coll.WithCapacity(cfg.EAMCCapacity)
	if err != nil {
		return empty(), 0, fmt.Sprintf("trace file %s ignored: %v", cfg.TracePath, err)
	}
	return out, out.Len(), ""
}

// Plan returns what Configure decided.
func (e *Engine) Plan() (Plan, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if err := e.ready(); err != nil {
		return Plan{}, err
	}
	return e.plan, nil
}

// ready checks that the engine is configured and open (caller holds mu or
// accepts a benign race on the flags, which only move forward).
func (e *Engine) ready() error {
	if e.closed {
		return ErrClosed
	}
	if !e.configured {
		return fmt.Errorf("%w: engine is not configured", ErrState)
	}
	return nil
}

func (e *Engine) readyLocked() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.ready()
}

// enter registers an operation that may hand out slot memory; Close waits
// for every entered operation to exit before it frees anything.
func (e *Engine) enter() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if err := e.ready(); err != nil {
		return err
	}
	e.ops.Add(1)
	return nil
}

// BeginRequest starts tracing a new request and returns its id (never 0).
func (e *Engine) BeginRequest() (uint64, error) {
	if err := e.readyLocked(); err != nil {
		return 0, err
	}
	return e.core.Begin(), nil
}

// EndRequest retires the request's EAM into the collection and cancels its
// prefetch plan.
func (e *Engine) EndRequest(req uint64) error {
	if err := e.readyLocked(); err != nil {
		return err
	}
	e.drainMapped() // the request's last layers are traced before it ends
	if err := e.core.End(req); err != nil {
		return fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	// A routing error the tracer found after the request's last mapped
	// layer surfaces here at the latest, never silently.
	return e.takeMappedErr()
}

// Observe records that, in MoE layer `layer`, request reqs[i] routed
// counts[i][x] tokens to expert x, refreshes the layer's eviction
// priorities and re-plans each request's prefetches for later layers.
func (e *Engine) Observe(layer int, reqs []uint64, counts [][]float32) error {
	return e.observe(layer, reqs, counts, true)
}

// observe is Observe, re-planning prefetches only when plan is set (the
// core's Observe, then its Plan: core.Layer without a use of the experts).
func (e *Engine) observe(layer int, reqs []uint64, counts [][]float32, plan bool) error {
	if err := e.checkObserve(layer, reqs, counts); err != nil {
		return err
	}
	if err := e.core.Observe(layer, reqs, counts); err != nil {
		return routingErr(err)
	}
	if plan {
		e.core.Plan(layer, reqs)
	}
	return nil
}

// checkObserve checks that the engine is ready and that layer, reqs and
// counts make an observation.
func (e *Engine) checkObserve(layer int, reqs []uint64, counts [][]float32) error {
	if err := e.readyLocked(); err != nil {
		return err
	}
	if layer < 0 || layer >= e.layers {
		return fmt.Errorf("%w: layer %d out of range [0, %d)", ErrInvalid, layer, e.layers)
	}
	if len(reqs) != len(counts) {
		return fmt.Errorf("%w: %d requests but %d count rows", ErrInvalid, len(reqs), len(counts))
	}
	return nil
}

// routingErr is a core error with the tracker's refusal of a routing
// classified as ErrInvalid.
func routingErr(err error) error {
	var oe *core.ObserveError
	if errors.As(err, &oe) {
		return fmt.Errorf("%w: %v", ErrInvalid, oe.Err)
	}
	return err
}

// countTokens adds one request's observed routing of layer to the
// per-expert token counters that Stats reports (the core's Observed hook).
func (e *Engine) countTokens(layer int, counts []float32) {
	row := e.expertTokens[layer*e.experts : (layer+1)*e.experts]
	e.tokensMu.Lock()
	for x, v := range counts {
		row[x] += float64(v)
	}
	e.tokensMu.Unlock()
}

// Hint tells the engine that `layer` will use experts (for example because
// that layer's router was run ahead on the current hidden state). They are
// prefetched before any EAM prediction. The hint lasts until the layer is
// acquired or hinted again.
func (e *Engine) Hint(layer int, experts []int32) error {
	if err := e.readyLocked(); err != nil {
		return err
	}
	if err := e.checkExperts(layer, experts); err != nil {
		return err
	}
	e.core.Hint(layer, experts)
	return nil
}

func (e *Engine) checkExperts(layer int, experts []int32) error {
	if layer < 0 || layer >= e.layers {
		return fmt.Errorf("%w: layer %d out of range [0, %d)", ErrInvalid, layer, e.layers)
	}
	for _, x := range experts {
		if x < 0 || int(x) >= e.experts {
			return fmt.Errorf("%w: expert %d out of range [0, %d) in layer %d", ErrInvalid, x, e.experts, layer)
		}
	}
	return nil
}

// MaxPin is the most distinct experts one Acquire may ask for: the number
// of slots. A layer that needs more streams them through in chunks.
func (e *Engine) MaxPin() int {
	if e.readyLocked() != nil {
		return 0
	}
	if e.views != nil {
		return min(e.cache.Slots(), e.views.count())
	}
	return e.cache.Slots()
}

// Acquire makes the experts of `layer` resident and pins them; slots[i]
// receives the slot of experts[i]. With the CPU backend it blocks until
// every copy is complete; with an ordered (GPU) backend it returns once the
// copies are issued and makes work later submitted to stream wait for them.
// The returned lease must be passed to Release once the computation that
// reads the slots has been submitted. Duplicate experts share one slot.
func (e *Engine) Acquire(layer int, experts []int32, slots []int32, stream uintptr) (uint64, error) {
	return e.acquire(layer, experts, slots, stream, true)
}

// acquire is Acquire; views=false hands out the slots themselves even for
// quantized experts (for kernels that read them compressed).
func (e *Engine) acquire(layer int, experts []int32, slots []int32, stream uintptr, views bool) (uint64, error) {
	if err := e.enter(); err != nil {
		return 0, err
	}
	defer e.ops.Done()
	if err := e.checkExperts(layer, experts); err != nil {
		return 0, err
	}
	if err := e.checkLayer(layer); err != nil {
		return 0, err
	}
	e.mapped.mu.Lock()
	capturing := e.mapped.capturing
	e.mapped.mu.Unlock()
	if capturing {
		return 0, fmt.Errorf("%w: experts cannot be acquired while a graph is captured (only mapped layers can be)", ErrState)
	}
	if len(slots) < len(experts) {
		return 0, fmt.Errorf("%w: slot buffer of %d for %d experts", ErrInvalid, len(slots), len(experts))
	}
	keys := make([]cache.Key, 0, len(experts))
	pos := make(map[int32]int, len(experts))
	for _, x := range experts {
		if _, ok := pos[x]; !ok {
			pos[x] = len(keys)
			keys = append(keys, cache.Key{Layer: int32(layer), Expert: x})
		}
	}
	grants, err := e.core.Pin(layer, keys, e.stop)
	if err != nil {
		return 0, e.cacheErr(err)
	}
	start := time.Now()
	loads := make([]backend.Transfer, len(grants))
	for i, g := range grants {
		if g.Load {
			loads[i] = e.be.Load(g.Slot, layer, int(g.Key.Expert), true)
			e.trackDemand(loads[i])
		}
	}
	var firstErr error
	waited := false
	for i, g := range grants {
		switch {
		case g.Load:
			waited = true
			err := loads[i].Err()
			e.cache.Complete(g.Slot, g.Gen, err)
			if err == nil {
				e.bytesMoved[layer].Add(e.lay.SlotBytes)
			} else if firstErr == nil {
				firstErr = fmt.Errorf("loading %s: %w", g.Key, err)
			}
		case !g.Hit:
			waited = true
			if err := e.cache.Wait(g, e.stop); err != nil && firstErr == nil {
				firstErr = fmt.Errorf("waiting for %s: %w", g.Key, e.cacheErr(err))
			}
		}
	}
	if waited {
		e.stallNs[layer].Add(int64(time.Since(start)))
	}
	if firstErr != nil {
		e.cache.Unpin(grants)
		return 0, firstErr
	}
	if ob := e.ft.Ordered; ob != nil {
		if err := ob.Use(grantSlots(grants), stream); err != nil {
			e.cache.Unpin(grants)
			return 0, fmt.Errorf("ordering the copies before the computation: %w", err)
		}
	}
	for i, x := range experts {
		slots[i] = int32(grants[pos[x]].Slot)
	}
	id := e.nextLeas.Add(1)
	if e.views != nil && views {
		if err := e.takeViews(id, experts, grants, pos, slots, stream); err != nil {
			e.cache.Unpin(grants)
			return 0, err
		}
	}
	e.leaseMu.Lock()
	e.leases[id] = grants
	e.leaseMu.Unlock()
	e.acquires.Add(1)
	return id, nil
}

func (e *Engine) cacheErr(err error) error {
	switch {
	case errors.Is(err, cache.ErrClosed), errors.Is(err, cache.ErrStopped):
		return ErrClosed
	}
	var tm *cache.TooManyError
	if errors.As(err, &tm) {
		return fmt.Errorf("%w: %v; acquire at most %d experts at a time", ErrBudget, err, tm.Slots)
	}
	return err
}

func grantSlots(grants []cache.Grant) []int {
	out := make([]int, len(grants))
	for i, g := range grants {
		out[i] = g.Slot
	}
	return out
}

// Release drops the pins of a lease returned by Acquire. With an ordered
// backend, the work submitted to stream so far is recorded as the slots'
// last reader, so that a later copy into them waits for it.
func (e *Engine) Release(lease uint64, stream uintptr) error {
	e.leaseMu.Lock()
	grants, ok := e.leases[lease]
	delete(e.leases, lease)
	free := ok && e.freeLate && len(e.leases) == 0
	if free {
		e.freeLate = false
	}
	e.leaseMu.Unlock()
	if !ok {
		return fmt.Errorf("%w: unknown or already released lease %d", ErrInvalid, lease)
	}
	var relErr error
	if e.views != nil {
		relErr = e.views.give(lease, stream)
	}
	if ob := e.ft.Ordered; ob != nil {
		relErr = errors.Join(relErr, ob.Release(grantSlots(grants), stream))
	}
	e.cache.Unpin(grants)
	if relErr != nil {
		return fmt.Errorf("recording the slots' last reader: %w", relErr)
	}
	if free {
		return e.free()
	}
	return nil
}

// Leases returns the number of leases not yet released.
func (e *Engine) Leases() int {
	e.leaseMu.Lock()
	defer e.leaseMu.Unlock()
	return len(e.leases)
}

// SlotAddr returns the address of a slot in the backend's memory.
func (e *Engine) SlotAddr(slot int) (uintptr, error) {
	if err := e.readyLocked(); err != nil {
		return 0, err
	}
	if slot < 0 || slot >= e.plan.Views.Count {
		return 0, fmt.Errorf("%w: slot %d out of range [0, %d)", ErrInvalid, slot, e.plan.Views.Count)
	}
	if e.views != nil {
		return e.views.addr(slot), nil
	}
	return e.be.SlotAddr(slot), nil
}

// Arena returns the base address and size of the slot memory.
func (e *Engine) Arena() (uintptr, int64, error) {
	if err := e.readyLocked(); err != nil {
		return 0, 0, err
	}
	if e.views != nil {
		return e.views.addr(0), e.views.bytes(), nil
	}
	a, n := e.be.Arena()
	return a, n, nil
}

// Progress reports the long work of loading, in bytes done of total: the
// backend's preparation of the host tier once Configure has started it,
// before that AddCompressed's compression of experts; zeros when there is
// none.
func (e *Engine) Progress() (done, total int64) {
	if p := e.opening.Load(); p != nil {
		if pr, ok := (*p).(backend.Progress); ok {
			return pr.Progress()
		}
		return 0, 0
	}
	return e.compressDone.Load(), e.compressTotal.Load()
}

// trackDemand counts an on-demand load until its copy physically ends, so
// that prefetches wait for the link to be free of demand copies.
func (e *Engine) trackDemand(tr backend.Transfer) {
	e.demandMu.Lock()
	e.demand++
	e.demandMu.Unlock()
	e.bg.Add(1)
	go func() {
		defer e.bg.Done()
		<-tr.Finished()
		e.demandMu.Lock()
		e.demand--
		if e.demand == 0 {
			close(e.demandIdle)
			e.demandIdle = make(chan struct{})
		}
		e.demandMu.Unlock()
	}()
}

// waitDemandIdle blocks while on-demand copies are in flight (on-demand
// requests preempt prefetches). It returns false when the engine stops.
func (e *Engine) waitDemandIdle() bool {
	for {
		e.demandMu.Lock()
		n, ch := e.demand, e.demandIdle
		e.demandMu.Unlock()
		if n == 0 {
			return true
		}
		select {
		case <-ch:
		case <-e.stop:
			return false
		}
	}
}

// dispatch drains the prefetch queue into the backend, keeping at most
// PrefetchWindow prefetch loads in flight and issuing none while on-demand
// copies are in flight. Which planned expert goes next and whether it is
// loaded are the core's decisions (TakePrefetch, ReservePrefetch: the ones
// go/sim replays); the waits are the engine's.
func (e *Engine) dispatch() {
	defer e.bg.Done()
	for {
		c, ok := e.core.TakePrefetch(e.stop)
		if !ok {
			return
		}
		if !e.waitDemandIdle() {
			e.core.PrefetchDone()
			return
		}
		select {
		case e.prefSem <- struct{}{}:
		case <-e.stop:
			e.core.PrefetchDone()
			return
		}
		g, ok := e.core.ReservePrefetch(c)
		if !ok {
			<-e.prefSem
			continue
		}
		tr := e.be.Load(g.Slot, int(c.Key.Layer), int(c.Key.Expert), false)
		e.bg.Add(1)
		go func() {
			defer e.bg.Done()
			err := tr.Err()
			e.cache.Complete(g.Slot, g.Gen, err)
			<-tr.Finished() // the window counts copies until they physically end
			if err == nil {
				e.bytesMoved[c.Key.Layer].Add(e.lay.SlotBytes)
			}
			<-e.prefSem
			e.core.PrefetchDone()
		}()
	}
}

// PrefetchIdle reports whether no prefetch is queued or in flight.
func (e *Engine) PrefetchIdle() bool {
	if e.readyLocked() != nil {
		return true
	}
	return e.queue.Idle()
}

// SaveTrace writes the EAM collection to path atomically.
func (e *Engine) SaveTrace(path string) error {
	if err := e.readyLocked(); err != nil {
		return err
	}
	e.drainMapped()
	return e.tracker.Collection().SaveFile(path)
}

// Close stops prefetching, waits for copies in flight, writes the trace
// file (if configured), frees the device tier and unmaps the checkpoint.
// Acquires blocked in Close's way fail with ErrClosed. If leases are still
// outstanding (a computation is reading slots), the memory is freed by the
// last Release instead, so that no reader ever sees unmapped memory.
// Idempotent.
func (e *Engine) Close() error {
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		return nil
	}
	e.closed = true
	configured := e.configured
	e.mu.Unlock()

	if !configured {
		return e.ckpt.Close()
	}
	close(e.stop)
	e.queue.Close()
	e.cache.Close()
	if e.views != nil {
		e.views.close()
	}
	e.ops.Wait()
	e.bg.Wait()
	var errs []error
	if e.cfg.TracePath != "" && e.tracker.Collection().Len() > 0 {
		if err := e.tracker.Collection().SaveFile(e.cfg.TracePath); err != nil {
			errs = append(errs, fmt.Errorf("saving trace: %w", err))
		}
	}
	e.leaseMu.Lock()
	late := len(e.leases) > 0
	e.freeLate = late
	e.leaseMu.Unlock()
	if !late {
		errs = append(errs, e.free())
	}
	return errors.Join(errs...)
}

// free releases the device tier and the checkpoint mappings.
func (e *Engine) free() error {
	if e.hybrid.k != nil {
		e.hybrid.k.close()
	}
	return errors.Join(e.be.Close(), e.ckpt.Close()) // the backend frees the views
}

// Closed reports whether Close has been called.
func (e *Engine) Closed() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.closed
}

// DebugPanic panics inside the engine; the C ABI's test hook uses it to
// check that panics never cross into the caller.
func (e *Engine) DebugPanic() {
	var m map[string]int
	m["engine test hook"]++ // a genuine runtime panic (nil map write)
}
