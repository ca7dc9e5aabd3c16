/* Compiles against the checked-in capi/moe_infinity.h and exercises the C
 * ABI end to end with a tiny model registered from C memory: configure,
 * acquire every expert through a 2-slot cache, compare the slot bytes with
 * the source tensors, check statuses and error messages. Exit code 0 on
 * success. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe_infinity.h"

#define L 2
#define E 4
#define H 8
#define I 4

static int failures = 0;

#define CHECK(cond, ...)                                                   \
    do {                                                                   \
        if (!(cond)) {                                                     \
            fprintf(stderr, "%s:%d: check failed: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                  \
            fprintf(stderr, "\n");                                         \
            failures++;                                                    \
        }                                                                  \
    } while (0)

static const char *last_error(void) {
    static char buf[4096];
    int64_t needed = 0;
    if (moe_last_error(buf, sizeof buf, &needed) != MOE_OK) return "(message too long)";
    return buf;
}

/* w[layer][expert][role][elem]; roles: 0 = w1 [I,H], 1 = w2 [H,I], 2 = w3 [I,H]. */
static float w[L][E][3][I * H];

int main(void) {
    uint64_t h = 0;
    char buf[1 << 16];
    int64_t needed = 0;

    CHECK(moe_version(buf, sizeof buf, &needed) == MOE_OK, "version");
    CHECK(strstr(buf, "0.") == buf, "version string %s", buf);
    CHECK(moe_version(buf, 2, &needed) == MOE_ERR_BUFFER, "small buffer");
    CHECK(needed > 2, "needed %lld", (long long)needed);

    /* Bad input gets a status and a message, never a crash. */
    CHECK(moe_engine_create("{\"budget_bytes\": 0}", &h) == MOE_ERR_INVALID, "zero budget");
    CHECK(strstr(last_error(), "budget_bytes must be > 0") != NULL, "message: %s", last_error());
    CHECK(moe_engine_create(NULL, &h) == MOE_ERR_INVALID, "NULL config");
    CHECK(moe_engine_create("not json", &h) == MOE_ERR_INVALID, "bad json");
    CHECK(moe_engine_create("{\"budget_bytes\": 1048576, \"policy\":\" \"}", &h) == MOE_ERR_INVALID, "blank policy");
    CHECK(strstr(last_error(), "policy: unknown cache policy \" \"") != NULL, "message: %s", last_error());
    CHECK(moe_engine_create("{\"budget_bytes\": 1048576} {\"policy\": \"lru\"}", &h) == MOE_ERR_INVALID, "trailing data");
    CHECK(strstr(last_error(), "unexpected data after the JSON object") != NULL, "message: %s", last_error());
    CHECK(moe_engine_close(987654) == MOE_ERR_HANDLE, "unknown handle");
    CHECK(strstr(last_error(), "unknown engine handle") != NULL, "message: %s", last_error());

    /* Slot: gate_up [2I, H] f32 (64 floats = 256 B) + down [H, I] (32 floats
     * = 128 B, at offset 256) → 512 B after 256-byte alignment. Budget: 2 slots. */
    CHECK(moe_engine_create("{\"budget_bytes\": 1100, \"policy\": \"lru\"}", &h) == MOE_OK, "create: %s", last_error());
    CHECK(h != 0, "handle");
    CHECK(moe_engine_add_checkpoint(h, "/definitely/not/here") == MOE_ERR_NOT_FOUND, "missing path: %s", last_error());

    const char *roles[3] = {"w1.weight", "w2.weight", "w3.weight"};
    for (int l = 0; l < L; l++)
        for (int e = 0; e < E; e++)
            for (int r = 0; r < 3; r++) {
                int64_t shape[2] = {r == 1 ? H : I, r == 1 ? I : H};
                for (int k = 0; k < I * H; k++) w[l][e][r][k] = (float)(l * 10000 + e * 1000 + r * 100 + k);
                char name[128];
                snprintf(name, sizeof name, "model.layers.%d.block_sparse_moe.experts.%d.%s", l, e, roles[r]);
                CHECK(moe_engine_add_host_tensor(h, name, "float32", 2, shape, w[l][e][r], sizeof w[l][e][r]) == MOE_OK,
                      "add %s: %s", name, last_error());
            }
    int64_t bad_shape[2] = {3, 3};
    CHECK(moe_engine_add_host_tensor(h, "x", "float32", 2, bad_shape, w, 8) != MOE_OK, "size mismatch");
    CHECK(moe_engine_add_host_tensor(h, "y", "complex64", 2, bad_shape, w, 72) == MOE_ERR_INVALID, "dtype: %s", last_error());

    CHECK(moe_engine_modules(h, buf, sizeof buf, &needed) == MOE_OK, "modules: %s", last_error());
    CHECK(strstr(buf, "\"prefix\":\"model.layers.1.block_sparse_moe\"") != NULL, "modules json %s", buf);

    uint64_t lease = 0;
    int32_t expert = 0, slot = -1;
    CHECK(moe_acquire(h, 0, 1, &expert, &slot, &lease, 0) == MOE_ERR_STATE, "acquire before configure");

    const char *setup =
        "{\"layout\": {\"regions\": ["
        "{\"name\": \"gate_up_proj\", \"parts\": [\"w1.weight\", \"w3.weight\"]},"
        "{\"name\": \"down_proj\", \"parts\": [\"w2.weight\"]}]}}";
    CHECK(moe_engine_slot_plan(h, setup, buf, sizeof buf, &needed) == MOE_OK, "slot plan: %s", last_error());
    CHECK(strstr(buf, "\"slot_bytes\":512") != NULL && strstr(buf, "\"alignment\":256") != NULL, "slot plan %s", buf);
    CHECK(moe_engine_slot_plan(h, NULL, buf, sizeof buf, &needed) == MOE_ERR_INVALID, "slot plan, NULL setup");
    CHECK(moe_engine_configure(h, setup, buf, 8, &needed) == MOE_ERR_BUFFER, "configure small buffer");
    CHECK(moe_engine_configure(h, setup, buf, sizeof buf, &needed) == MOE_OK, "configure: %s", last_error());
    CHECK(strstr(buf, "\"slots\":2") != NULL, "plan %s", buf);
    CHECK(strstr(buf, "\"slot_bytes\":512") != NULL, "plan %s", buf);

    int32_t maxpin = 0;
    CHECK(moe_engine_max_pin(h, &maxpin) == MOE_OK && maxpin == 2, "max pin %d", maxpin);
    uint64_t arena = 0;
    int64_t arena_bytes = 0;
    CHECK(moe_engine_arena(h, &arena, &arena_bytes) == MOE_OK && arena != 0 && arena_bytes == 1024, "arena");

    uint64_t req = 0;
    CHECK(moe_request_begin(h, &req) == MOE_OK && req != 0, "begin");
    for (int l = 0; l < L; l++) {
        float counts[E] = {1, 1, 1, 1};
        CHECK(moe_observe(h, l, 1, &req, counts) == MOE_OK, "observe: %s", last_error());
        for (int e = 0; e < E; e++) {
            expert = e;
            CHECK(moe_acquire(h, l, 1, &expert, &slot, &lease, 0) == MOE_OK, "acquire: %s", last_error());
            uint64_t addr = 0;
            CHECK(moe_engine_slot_addr(h, slot, &addr) == MOE_OK, "slot addr");
            const float *s = (const float *)(uintptr_t)addr;
            CHECK(memcmp(s, w[l][e][0], sizeof w[l][e][0]) == 0, "w1 bytes of L%d/E%d", l, e);
            CHECK(memcmp(s + I * H, w[l][e][2], sizeof w[l][e][2]) == 0, "w3 bytes of L%d/E%d", l, e);
            CHECK(memcmp((const char *)s + 256, w[l][e][1], sizeof w[l][e][1]) == 0, "w2 bytes of L%d/E%d", l, e);
            CHECK(moe_release(h, lease, 0) == MOE_OK, "release");
        }
    }
    CHECK(moe_release(h, lease, 0) == MOE_ERR_INVALID, "double release");
    int32_t three[3] = {0, 1, 2}, out[3];
    CHECK(moe_acquire(h, 0, 3, three, out, &lease, 0) == MOE_ERR_BUDGET, "3 experts, 2 slots");
    CHECK(strstr(last_error(), "acquire at most 2 experts at a time") != NULL, "%s", last_error());
    expert = 99;
    CHECK(moe_acquire(h, 0, 1, &expert, &slot, &lease, 0) == MOE_ERR_INVALID, "bad expert");
    CHECK(moe_hint(h, 1, 1, three) == MOE_OK, "hint");
    int64_t hid = 0, inter = 0, done = -1, total = -1;
    int32_t code = -1;
    CHECK(moe_ffn_shape(h, &hid, &inter, &code) == MOE_ERR_UNSUPPORTED, "f32 experts do not fit the kernels: %s", last_error());
    CHECK(moe_engine_progress(h, &done, &total) == MOE_OK && done == 0 && total == 0, "cpu progress");
    /* The executor and graphs with f32 experts (no kernels, no mapped
     * mode): clear errors, never a crash, for bad arguments. */
    int64_t ids[2] = {0, 1};
    float xs[H], ys[H], hs[2 * I], ws[2] = {0.5f, 0.5f};
    uint64_t A = (uint64_t)(uintptr_t)xs, B = (uint64_t)(uintptr_t)ys, S = (uint64_t)(uintptr_t)hs;
    uint64_t T = (uint64_t)(uintptr_t)ids, W = (uint64_t)(uintptr_t)ws;
    /* The layer executor: on the CPU backend every layer is the caller's
     * code; without the host routing it asks for it. */
    int32_t need[4] = {-1, -1, -1, -1};
    moe_layer_args la = {0};
    la.layer = 0; la.nreq = 1; la.reqs = &req; la.topk = T; la.tokens = 1; la.k = 2;
    la.x = A; la.out = B; la.scratch = S; la.weights = W;
    la.dtype = -1; la.weights_dtype = -1; la.experts_cap = 4; la.experts = need;
    CHECK(moe_layer(h, &la) == MOE_OK && la.path == MOE_PATH_NEED_ROUTING && la.n_experts == 0, "no host routing: %s", last_error());
    la.topk_host = ids;
    CHECK(moe_layer(h, &la) == MOE_OK && la.path == MOE_PATH_HOST_STREAM, "host path: %s", last_error());
    CHECK(la.n_experts == 2 && need[0] == 0 && need[1] == 1, "experts handed back: %d", la.n_experts);
    la.flags = MOE_LAYER_HOST_BATCHED;
    CHECK(moe_layer(h, &la) == MOE_OK && la.path == MOE_PATH_HOST_STACKED, "stacked: %s", last_error());
    int64_t gapped[2] = {1, MOE_ROUTING_GAP};
    la.topk_host = gapped;
    CHECK(moe_layer(h, &la) == MOE_ERR_INVALID, "a gap without MOE_LAYER_ROUTING_GAPS");
    la.flags = MOE_LAYER_ROUTING_GAPS;
    CHECK(moe_layer(h, &la) == MOE_OK && la.path == MOE_PATH_HOST_STREAM && la.n_experts == 1 && need[0] == 1, "gaps: %s", last_error());
    la.topk_host = ids; la.flags = MOE_LAYER_HOST_BATCHED;
    la.experts_cap = 1;
    CHECK(moe_layer(h, &la) == MOE_ERR_INVALID, "experts_cap too small");
    la.experts_cap = 4; la.flags = 64;
    CHECK(moe_layer(h, &la) == MOE_ERR_INVALID && strstr(last_error(), "unknown flags") != NULL, "bad flags: %s", last_error());
    la.flags = 0; la.tokens = 0;
    CHECK(moe_layer(h, &la) == MOE_ERR_INVALID, "no tokens");
    la.tokens = 1; la.reqs = NULL;
    CHECK(moe_layer(h, &la) == MOE_ERR_INVALID, "NULL reqs");
    la.reqs = &req; la.weights_dtype = 7;
    CHECK(moe_layer(h, &la) == MOE_ERR_INVALID && strstr(last_error(), "weights_dtype") != NULL, "weights dtype: %s", last_error());
    la.weights_dtype = -1;
    CHECK(moe_layer(h, NULL) == MOE_ERR_INVALID, "NULL args");
    CHECK(moe_layer(987654, &la) == MOE_ERR_HANDLE, "layer, unknown handle");
    int32_t captured = -1;
    CHECK(moe_capture_begin(h) == MOE_ERR_UNSUPPORTED, "capture f32: %s", last_error());
    CHECK(moe_capture_end(h, &captured) == MOE_ERR_STATE, "end without begin: %s", last_error());
    CHECK(moe_capture_end(h, NULL) == MOE_ERR_INVALID, "NULL layers");
    CHECK(moe_graph_step(h, 0, 1, &req) == MOE_ERR_STATE, "step without capture: %s", last_error());
    CHECK(moe_graph_step(h, 0, 1, NULL) == MOE_ERR_INVALID, "step, NULL reqs");
    CHECK(moe_device_memory(0, &done, &total) == MOE_ERR_UNSUPPORTED || done > 0, "device memory");
    CHECK(moe_request_end(h, req) == MOE_OK, "end");

    CHECK(moe_stats(h, buf, sizeof buf, &needed) == MOE_OK, "stats");
    CHECK(strstr(buf, "\"misses\":8") != NULL, "stats %s", buf);
    CHECK(strstr(buf, "\"bytes_moved\":") != NULL, "stats %s", buf);
    CHECK(moe_reset_stats(h) == MOE_OK, "reset");

    /* The Go runtime reads the environment when the library loads, so the
     * hook is switched on by running this program with the variable set. */
    if (getenv("MOE_INFINITY_TEST_HOOKS") == NULL) {
        CHECK(moe_debug_panic(h) == MOE_ERR_UNSUPPORTED, "hook off by default");
    } else {
        CHECK(moe_debug_panic(h) == MOE_ERR_INTERNAL, "panic becomes a status");
        CHECK(strstr(last_error(), "internal error") != NULL, "%s", last_error());
        CHECK(moe_stats(h, buf, sizeof buf, &needed) == MOE_OK, "the engine still works after a panic");
    }

    CHECK(moe_engine_close(h) == MOE_OK, "close: %s", last_error());
    CHECK(moe_stats(h, buf, sizeof buf, &needed) == MOE_ERR_HANDLE, "use after close");

    if (failures) {
        fprintf(stderr, "capi_test: %d failure(s)\n", failures);
        return 1;
    }
    printf("capi_test: ok\n");
    return 0;
}
