/*
 * moe_infinity.h — C ABI of the moe_infinity offloading engine.
 *
 * Every function returns a status code (MOE_OK on success). After a failure
 * moe_last_error() returns the calling thread's last error message. No
 * function ever lets a Go panic escape: a panic becomes MOE_ERR_INTERNAL.
 * Engines are opaque integer handles (never 0). No Go pointer crosses this
 * boundary: memory handed out (the slot arena) is mmap'ed or device memory.
 *
 * Strings are NUL-terminated UTF-8. Functions that return JSON write it to
 * (buf, cap) and store the length without the terminating NUL in *needed;
 * when cap <= *needed they return MOE_ERR_BUFFER and write nothing, so the
 * caller can retry with a larger buffer.
 *
 * Call order: moe_engine_create → moe_engine_add_checkpoint /
 * moe_engine_add_host_tensor → moe_engine_configure → (per request)
 * moe_request_begin, per MoE layer moe_observe + moe_acquire + compute +
 * moe_release, moe_request_end → moe_engine_close.
 *
 * This header is checked in; capi/abi_test.go fails when it drifts from the
 * //export declarations in the capi package.
 */
#ifndef MOE_INFINITY_H
#define MOE_INFINITY_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* One MoE layer for moe_layer, the layer executor: the caller's tensors
 * and what it can do; the engine chooses how the layer runs and writes
 * which path it took. Addresses are device memory for the CUDA backend and
 * host memory for the CPU backend. */
typedef struct moe_layer_args {
    int32_t layer;            /* MoE layer index */
    int32_t nreq;             /* requests the tokens belong to (split evenly in row order) */
    const uint64_t *reqs;     /* nreq request ids */
    const int64_t *topk_host; /* [tokens, k] expert ids in host memory; NULL when only on the device */
    uint64_t stream;          /* CUstream the computation is ordered on (0 for the CPU) */
    uint64_t x;               /* [tokens, hidden] activations */
    uint64_t out;             /* [tokens, hidden] output, written by the kernel paths */
    uint64_t scratch;         /* [tokens * k, inter] float32, for the kernel paths */
    uint64_t topk;            /* [tokens, k] int64 expert ids where the computation reads them */
    uint64_t weights;         /* [tokens, k] routing weights of weights_dtype */
    int64_t tokens;           /* T > 0 */
    int64_t k;                /* experts per token > 0 */
    int32_t dtype;            /* activations: 0 bfloat16, 1 float16, -1 other */
    int32_t weights_dtype;    /* routing weights: 0 float32, 1 bfloat16, 2 float16, -1 other */
    uint32_t flags;           /* MOE_LAYER_* */
    int32_t path;             /* out: the MOE_PATH_* taken */
    int32_t experts_cap;      /* capacity of experts (the model's experts per layer suffice) */
    int32_t n_experts;        /* out: host paths: the number of distinct experts written */
    int32_t *experts;         /* out: host paths: the distinct experts the caller's code computes, ascending */
    uint64_t partial;         /* [tokens, hidden] float32, for the host paths' CPU part (hybrid execution); 0: none offered */
    int32_t n_cpu_experts;    /* out: host paths: the number of cpu_experts written */
    int32_t *cpu_experts;     /* out: host paths: experts the CPU computed into partial, ascending (capacity experts_cap):
                               * not in experts; the caller's code skips their pairs and adds partial */
} moe_layer_args;

/* moe_layer_args.flags: facts about the caller, never a choice of path. */
#define MOE_LAYER_NO_MAPPED 1     /* mapped mode off, or every layer's host routing wanted */
#define MOE_LAYER_NO_KERNELS 2    /* the caller's own expert code everywhere */
#define MOE_LAYER_HOST_BATCHED 4  /* the caller's expert code is batched over stacked experts */
#define MOE_LAYER_ROUTING_GAPS 8  /* topk_host holds MOE_ROUTING_GAP where the router dropped a token's expert */
#define MOE_LAYER_ROWWISE 16      /* each token is another request's row: choose the path as for one token */

/* The id of an empty place in topk_host, with MOE_LAYER_ROUTING_GAPS. */
#define MOE_ROUTING_GAP -1

/* moe_layer_args.path: what moe_layer did. */
#define MOE_PATH_MAPPED 1       /* computed by the kernels reading experts in place; no host sync */
#define MOE_PATH_KERNELS 2      /* routing traced, experts made resident, computed by the kernels */
#define MOE_PATH_HOST_STREAM 3  /* routing traced; the caller computes, acquiring experts one at a time */
#define MOE_PATH_HOST_STACKED 4 /* routing traced; the caller computes on the experts stacked */
#define MOE_PATH_NEED_ROUTING 5 /* nothing ran: call again with topk_host */

#ifndef MOE_INFINITY_TYPES_ONLY

/* Status codes. */
#define MOE_OK 0
#define MOE_ERR_INVALID 1     /* bad argument or malformed JSON */
#define MOE_ERR_NOT_FOUND 2   /* a file or directory does not exist */
#define MOE_ERR_IO 3          /* reading or writing a file failed */
#define MOE_ERR_FORMAT 4      /* a checkpoint or trace file is malformed */
#define MOE_ERR_BUDGET 5      /* the memory budget is too small */
#define MOE_ERR_CLOSED 6      /* the engine is closed */
#define MOE_ERR_STATE 7       /* call made in the wrong order */
#define MOE_ERR_UNSUPPORTED 8 /* not available in this build */
#define MOE_ERR_INTERNAL 9    /* a bug: an internal panic was caught */
#define MOE_ERR_BUFFER 10     /* output buffer too small; see *needed */
#define MOE_ERR_HANDLE 11     /* unknown engine handle */
#define MOE_ERR_CHECKPOINT_CHANGED 12 /* a mapped checkpoint file changed on disk; reload */

/* Library version string, e.g. "0.1.0 (cpu)". */
int32_t moe_version(char *buf, int64_t cap, int64_t *needed);

/* The calling thread's last error message ("" if none). */
int32_t moe_last_error(char *buf, int64_t cap, int64_t *needed);

/* Creates an engine from a JSON config (see go/engine.Config:
 * budget_bytes, policy, prefetch, eamc_capacity, matches,
 * prefetch_window, workers, trace_path, backend, max_slots). */
int32_t moe_engine_create(const char *config_json, uint64_t *handle);

/* Stops the engine's goroutines and frees its memory. Idempotent for a
 * live handle; the handle is invalid afterwards. */
int32_t moe_engine_close(uint64_t handle);

/* Maps a safetensors checkpoint: a directory, a .safetensors file or a
 * model.safetensors.index.json. */
int32_t moe_engine_add_checkpoint(uint64_t handle, const char *path);

/* Compresses the routed experts of a float checkpoint to block FP8 once,
 * into a directory, and maps that copy as the checkpoint of the experts
 * (configure with quant_method "fp8" and the answer's weight_block_size).
 * request_json: {"source": checkpoint path, "dir": directory of the copy,
 * "key": the source's version; a copy made under another key, for other
 * source files or cut short is rewritten, a valid one reused}. Answers
 * {"reused", "dir", "quant_method", "weight_block_size", "files",
 * "tensors", "quantized", "bytes", "source_bytes"}; moe_engine_progress
 * reports the source bytes done meanwhile. A retry after MOE_ERR_BUFFER
 * finds the copy made and reuses it. MOE_ERR_UNSUPPORTED: experts that are
 * not float (already quantized). */
int32_t moe_engine_add_compressed(uint64_t handle, const char *request_json, char *buf,
                                  int64_t cap, int64_t *needed);

/* Registers a tensor living in caller-owned host memory (valid until
 * close). dtype: "float32", "bfloat16", "F16", ... */
int32_t moe_engine_add_host_tensor(uint64_t handle, const char *name, const char *dtype,
                                   int32_t ndim, const int64_t *shape, const void *data,
                                   int64_t nbytes);

/* Replaces the float experts of one MoE module, added with
 * moe_engine_add_host_tensor, by their block-FP8 copy (128 x 128 blocks,
 * the bytes moe_engine_add_compressed writes) in host memory the engine
 * owns until close; the engine no longer reads the tensors added for the
 * module when it returns (the caller may free them). Configure with
 * quant_method "fp8" and the answer's weight_block_size. request_json:
 * {"prefix": the module, everything before ".experts." in its names}.
 * Answers {"prefix", "quant_method", "weight_block_size", "released",
 * "tensors", "bytes", "source_bytes"}; a retry after MOE_ERR_BUFFER gets
 * the same answer. MOE_ERR_INVALID: no such module, or tensors not added
 * from host memory; MOE_ERR_UNSUPPORTED: experts that are not float. */
int32_t moe_engine_compress_host(uint64_t handle, const char *request_json, char *buf,
                                 int64_t cap, int64_t *needed);

/* JSON list of discovered MoE modules: prefix, num_experts, fused, roles. */
int32_t moe_engine_modules(uint64_t handle, char *buf, int64_t cap, int64_t *needed);

/* Fixes layer order and slot layout (JSON: {"layers": [...], "layout":
 * {"regions": [{"name", "parts", "dtype"}], "alignment"}}), sizes the cache
 * and writes the resulting plan as JSON. */
int32_t moe_engine_configure(uint64_t handle, const char *setup_json, char *buf, int64_t cap,
                             int64_t *needed);

/* The slot layout moe_engine_configure would make for setup_json (the
 * same JSON; its budget is not looked at), as JSON, without configuring:
 * slot_bytes (one expert's slot), layout, and for quantized experts
 * view_bytes (one dequantized view). For sizing a budget beforehand. */
int32_t moe_engine_slot_plan(uint64_t handle, const char *setup_json, char *buf, int64_t cap,
                             int64_t *needed);

/* Base address and size in bytes of the slot arena. */
int32_t moe_engine_arena(uint64_t handle, uint64_t *addr, int64_t *bytes);

/* Address of one slot. */
int32_t moe_engine_slot_addr(uint64_t handle, int32_t slot, uint64_t *addr);

/* Most distinct experts one moe_acquire may pin (the number of slots). */
int32_t moe_engine_max_pin(uint64_t handle, int32_t *n);

/* Starts tracing a request (sequence); *req is never 0. */
int32_t moe_request_begin(uint64_t handle, uint64_t *req);

/* Retires the request's activation matrix into the trace collection. */
int32_t moe_request_end(uint64_t handle, uint64_t req);

/* Records routing of MoE layer `layer`: counts is nreq × num_experts
 * floats, row i the tokens of request reqs[i] routed to each expert. */
int32_t moe_observe(uint64_t handle, int32_t layer, int32_t nreq, const uint64_t *reqs,
                    const float *counts);

/* Makes n experts of `layer` resident and pins them; slots[i] receives
 * experts[i]'s slot. CPU backend: blocks until the copies are complete.
 * CUDA backend: returns once the copies are issued; work submitted later to
 * `stream` (a raw CUstream, e.g. torch.cuda.current_stream().cuda_stream)
 * waits for them. Release the lease once the computation reading the slots
 * has been submitted. */
int32_t moe_acquire(uint64_t handle, int32_t layer, int32_t n, const int32_t *experts,
                    int32_t *slots, uint64_t *lease, uint64_t stream);

/* Drops a lease's pins. CUDA backend: the work submitted to `stream` so far
 * becomes the slots' last reader; a later copy into them waits for it. */
int32_t moe_release(uint64_t handle, uint64_t lease, uint64_t stream);

/* One MoE layer's expert FFN (SwiGLU) over every (token, expert) pair in
 * one call: acquires the n distinct experts routed to, launches the
 * backend's kernels on `stream` and releases them. T tokens with k experts
 * each. Addresses (host for the CPU backend, device for CUDA): x [T, H] and
 * out [T, H] in the experts' dtype (0 = bfloat16, 1 = float16), scratch
 * [T*k, I] float32, topk [T, k] int64 expert ids (the router's
 * top_k_index), weights [T, k] float32. Needs gate_up_proj [2I, H] and
 * down_proj [H, I] regions. Outside the executor (no tracing, no choice of
 * path): the kernels' probe for tests and benchmarks. */
int32_t moe_layer_ffn(uint64_t handle, int32_t layer, int32_t n, const int32_t *experts,
                      uint64_t stream, uint64_t x, uint64_t out, uint64_t scratch, uint64_t topk,
                      uint64_t weights, int64_t tokens, int64_t k, int32_t dtype);

/* The layer executor: one MoE layer in one call. The engine chooses how
 * the layer runs — mapped (kernels reading experts in place), kernels
 * (routing traced, experts copied into slots), or the caller's own code on
 * slot views (streamed or stacked) — from the backend's capabilities, the
 * model's experts, the call's shape and args->flags, runs it, and writes
 * args->path. MOE_PATH_NEED_ROUTING: call again with topk_host set. On the
 * host paths with hybrid execution on, given args->partial and the kernels'
 * arguments (x, weights, dtype, weights_dtype), the engine may compute some
 * missed experts (those of few tokens) on the CPU into partial before it
 * returns: it lists them in cpu_experts, not in experts; the caller's code
 * skips their pairs and adds partial (stream-ordered on stream). The
 * choice is the engine's alone: moe_engine_configure's plan ("executor")
 * says what it can do, moe_stats ("paths") what it did.
 * On MOE_PATH_MAPPED nothing waited for the host: the routing (topk) is
 * copied to the host and traced asynchronously, and an error found in it
 * (an id out of range: its expert was skipped) is returned by a later call
 * once traced, and at the latest by moe_request_end. */
int32_t moe_layer(uint64_t handle, moe_layer_args *args);

/* CUDA graphs of mapped layers. moe_capture_begin precedes capturing a
 * decode step (every MoE layer through moe_layer on MOE_PATH_MAPPED, on one stream):
 * copies wait until moe_capture_end (their table updates must not join the
 * graph), moe_acquire fails, and each layer's routing is staged on the
 * device. moe_capture_end writes the number of MoE layers captured. After
 * each replay, moe_graph_step (same stream) copies the staged routing to
 * the host and traces it for the nreq requests, asynchronously.
 * MOE_ERR_UNSUPPORTED without mapped mode or graphs (the CPU backend
 * stages and re-traces but has no graphs). */
int32_t moe_capture_begin(uint64_t handle);
int32_t moe_capture_end(uint64_t handle, int32_t *layers);
int32_t moe_graph_step(uint64_t handle, uint64_t stream, int32_t nreq, const uint64_t *reqs);

/* Hidden size H, intermediate size I and dtype code of the expert FFN, or
 * MOE_ERR_UNSUPPORTED when the layout does not fit the kernels. */
int32_t moe_ffn_shape(uint64_t handle, int64_t *hidden, int64_t *inter, int32_t *dtype);

/* Progress of the long work of loading, in bytes done of total: preparing
 * the host tier during configure, or before it the source expert bytes
 * moe_engine_add_compressed has compressed (both 0 when there is none).
 * Safe to call from another thread while either runs. */
int32_t moe_engine_progress(uint64_t handle, int64_t *done, int64_t *total);

/* Total and free memory of CUDA device `device` in bytes (NVML's numbers
 * where available); MOE_ERR_UNSUPPORTED in the CPU build. */
int32_t moe_device_memory(int32_t device, int64_t *total, int64_t *free);

/* Hints that `layer` will use these experts (prefetched first). */
int32_t moe_hint(uint64_t handle, int32_t layer, int32_t n, const int32_t *experts);

/* Counters as JSON (totals and per layer). */
int32_t moe_stats(uint64_t handle, char *buf, int64_t cap, int64_t *needed);

/* Zeroes the counters. */
int32_t moe_reset_stats(uint64_t handle);

/* Writes the trace collection to path atomically. */
int32_t moe_save_trace(uint64_t handle, const char *path);

/* Changes a configured engine at run time (JSON, every field optional):
 * {"policy": "lru", "prefetch": false, "graph_misses": "copy",
 * "cpu_experts": "off", "flush": true, "reset_stats": true}; cpu_experts
 * also takes "auto" or a thread count (a number). */
int32_t moe_engine_tune(uint64_t handle, const char *tuning_json);

/* The configured engine's plan as JSON, as moe_engine_configure wrote it
 * with what tuning changed since (policy, prefetch, graph_misses, the
 * executor's hybrid fields). MOE_ERR_INVALID before configure. */
int32_t moe_engine_plan(uint64_t handle, char *buf, int64_t cap, int64_t *needed);

/* Process-wide engine runtime counters as JSON: goroutines, heap_alloc and
 * heap_sys (bytes of Go heap), engines (open handles). For leak tests. */
int32_t moe_runtime_stats(char *buf, int64_t cap, int64_t *needed);

/* Test hook: panics inside the engine when the environment variable
 * MOE_INFINITY_TEST_HOOKS=1, to check that panics become MOE_ERR_INTERNAL;
 * otherwise returns MOE_ERR_UNSUPPORTED. */
int32_t moe_debug_panic(uint64_t handle);

#endif /* MOE_INFINITY_TYPES_ONLY */

#ifdef __cplusplus
}
#endif

#endif /* MOE_INFINITY_H */
