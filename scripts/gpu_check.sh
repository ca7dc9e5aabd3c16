#!/usr/bin/env bash
# One call on the GPU machine: runs the GPU suite against the CUDA build of
# the engine made on the CPU machine (`make cuda`), and prints a summary.
#
#   bash scripts/gpu_check.sh [gpu|parity|bench|headline|copy|defaults|margin|serve|serve-hybrid|profile|variants|fp8|fp8-sm89|gptoss|gptoss-bench|hybrid|pending|pending-short|all]     (default: all)
#
# pending: the runs prepared and not yet made, in one call: the sm89 PTX
# through ptxas, the sm89 / FP8-default / gpt-oss / hybrid-parity GPU tests,
# the eager hand-off with cpu_experts off, auto and 16, FP8 decode sm80 vs
# sm89, and the SIMD FFN's worker pool against goroutines where
# build/cpuffn_gor.test (main) and build/cpuffn_pool.test (branch
# cpuffn-pool) were carried. ~9.5 minutes. pending-short: its first part
# alone (ptxas, the GPU tests, the eager run), then the stacked serve
# step's host cost (benchmarks/stacked_step.py), ~6 minutes.
#
# fp8: the FP8 kernels' GPU tests (FP8 checkpoints and offload(expert_dtype=
# "fp8"), slot and mapped mode, CUDA graphs), then the Qwen3-30B-A3B shape at
# 24 GiB on generated routing with bf16 and then FP8 experts in one decode.py
# process (same weights, routing and link rate; quantized_kernels on): the
# FP8 row's s_per_token_vs_bf16 is the quantized-experts issue's ratio
# (target <= 0.60), ratio_to_floor its own floor's (<= 1.15). CUDA-graph
# steps for both (FP8 experts run in mapped mode like bf16 ones). Fits one
# call (~9 minutes at most).
#
# fp8-sm89: the sm89 kernel build (engine option kernel_build "sm89": FP8
# weights decoded by the hardware's cvt.rn.f16x2.e4m3x2; opt-in until this
# step has passed on a GPU): the FP8 GPU tests, among them
# test_fp8_kernel_builds_give_the_same_bits (both builds in one process,
# logits bit for bit), then the Qwen3-30B-A3B shape at 24 GiB with FP8
# experts decoded with sm80 and then sm89 in one decode.py process (same
# weights and routing): the sm89 row's s_per_token_vs_sm80 is what the
# hardware decode gains. Needs compute capability >= 8.9 (H100); fits one call
# (~9 minutes at most).
#
# gptoss: the gpt-oss kernels' GPU tests (bfloat16 and MXFP4 experts, engine
# option quantized_kernels; opt-in until this step has passed on a GPU):
# teacher-forced agreement with transformers and with the CPU reference, and
# one layer's FFN against the CPU reference at several token counts.
#
# gptoss-bench: the gpt-oss-120b shape (MXFP4 experts as released, random;
# 61 GB of host memory) at 24 GiB on generated routing: transformers' code on
# dequantized views (the default), then the gpt-oss MXFP4 kernels
# (--quantized-kernels), each in its own process (~2 x 4 minutes).
#
# hybrid: the CPU computing missed experts where they lie (cpu_experts),
# with the link measured at start-up (measure_link): for each shape, one
# decode.py process, CUDA-graph steps in copy mode (the graph hand-off
# rides it) with cpu_experts off, auto (every core but two) and 12 threads on one
# loaded model; the eager path (--no-mapped, the eager hand-off) off, auto
# and 16 (every core); Mixtral at 8 GiB off and auto. Then the SIMD expert FFN against
# the host's read bandwidth (build/cpuffn.test, made by `make
# cpuffn-test`; no Go there) on every core. ~9 minutes.
#
# serve-hybrid: the Qwen3 serve load with the CPU computing missed
# experts (cpu_experts off and auto on one model, the link measured),
# stacked exact and stacked-fast steps at 1 and 16 clients, on the
# synchronous kernel path (mapped off: mapped mode never hands the CPU a
# share). Exact steps never give the CPU a share either, so their rows
# are the control. ~7 minutes.
#
# profile: Mixtral's replayed steps under the torch profiler, with copy
# mode's waits split into copying and idle (benchmarks/profile_step.py).
# variants: VARIANTS="build/A build/B" runs the Mixtral decode once with each
# build (directories holding a libmoe_infinity_cuda.so, and the revision's
# python/ and benchmarks/; scripts/build_variants.sh A=rev B=rev makes
# them), on one machine, so that A/B comparisons do not mix machines.
# VARIANT_RUN=serve runs the Qwen3 serve load (stacked, 1 and 16 clients)
# instead, ~2.5 minutes a variant; VARIANT_RUN=hybrid the Qwen3 graph rows
# with cpu_experts off and auto (~2 minutes a variant: the CPU's experts
# never admitted, before 7d293e7, against offered to the cache).
#
# headline: the GPU tests, then the decode headlines with CUDA graphs
# (Qwen3-30B-A3B shape: pipelined replays with every ablation, and
# step-by-step replays; Mixtral-8x7B shape: pipelined), ~8 minutes.
#
# Needs build/libmoe_infinity_cuda.so (or MOE_INFINITY_LIB). Python packages
# missing on the machine can travel as wheels in .whl/ (installed to
# /tmp/site). Logs and JSON go to $OUT (default build/gpu-check).
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
OUT=${OUT:-build/gpu-check}
mkdir -p "$OUT"
LIB=${MOE_INFINITY_LIB:-$PWD/build/libmoe_infinity_cuda.so}
if [ ! -f "$LIB" ] && [ "$what" != variants ]; then
    echo "gpu_check: $LIB is missing; build it with 'make cuda' (needs Go) and carry it here" >&2
    exit 2
fi
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
export MOE_INFINITY_LIB=$LIB PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers, moe_infinity as m; print('torch', torch.__version__, 'transformers', transformers.__version__, 'engine', m.engine_version())"
} 2>&1 | tee "$OUT/env.txt"

status=0
run() {  # name, command...
    local name=$1
    shift
    echo "== $name"
    "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc" | tee -a "$OUT/summary.txt"
    [ "$rc" = 0 ] || status=1
}
# Runs more than one mode makes, stated once.
H="python3 benchmarks/decode.py --decode 32 --routing generated --no-ablations --measure-link"
eager_hybrid() {  # timeout: Qwen3's eager hand-off with cpu_experts off, auto (every core but two) and 16 (every core)
    run hybrid_qwen3_eager timeout "$1" $H --device-memory 24GiB --cpu-experts off,auto,16 --no-mapped --preset qwen3-30b-a3b --out "$OUT/hybrid_qwen3_eager.json"
}
ptxas_sm89() {  # ptxas (triton ships one) names the line and the feature when the driver would reject the sm89 PTX
    local ptxas
    ptxas=$(python3 -c "import os, triton; print(os.path.join(os.path.dirname(triton.__file__), 'backends/nvidia/bin/ptxas'))" 2>/dev/null)
    [ -x "$ptxas" ] && run ptxas_sm89 "$ptxas" -arch=sm_89 go/backend/cuda/moe_ffn_sm89.ptx -o "$OUT/moe_ffn_sm89.cubin"
}
fp8_sm80_sm89() {  # timeout: the Qwen3 shape with FP8 experts, decoded with the sm80 and then the sm89 kernels, one process
    run qwen3_fp8_sm80_sm89 timeout "$1" python3 benchmarks/decode.py --preset qwen3-30b-a3b --device-memory 24GiB --decode 32 \
        --routing generated --no-ablations --expert-dtype fp8 --quantized-kernels --kernel-build sm80,sm89 --graph \
        --out "$OUT/decode_qwen3_fp8_sm80_sm89.json"
}
stacked_step() {  # the host cost of a stacked serve step (torch calls and ms per step), exact and fast, 1 to 16 requests
    run stacked_step timeout 90 python3 benchmarks/stacked_step.py --device cuda --rows 1,4,16 --out "$OUT/stacked_step.jsonl"
}
if [ "$what" = gpu ] || [ "$what" = all ]; then
    # tests/test_gpu.py includes the FP8 kernels' tests (engine option quantized_kernels).
    run gpu_tests python3 -m pytest -p no:cacheprovider -q -m gpu -rA tests/test_gpu.py tests/test_backend_ops.py tests/test_gpu_memory.py tests/test_scheduler.py tests/test_checkpoint_changed.py
fi
if [ "$what" = parity ] || [ "$what" = all ]; then
    MOE_INFINITY_TEST_DEVICE=cuda run parity_cuda python3 -m pytest -p no:cacheprovider -q -x tests/test_parity.py tests/test_generation_modes.py
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
    run kernel_ffn python3 benchmarks/kernel_ffn.py --out "$OUT/kernel_ffn.json"
    run zero_copy python3 benchmarks/zero_copy.py --out "$OUT/zero_copy.json"
fi
if [ "$what" = headline ]; then
    run gpu_tests python3 -m pytest -p no:cacheprovider -q -m gpu -rA tests/test_gpu.py tests/test_backend_ops.py tests/test_gpu_memory.py tests/test_scheduler.py tests/test_checkpoint_changed.py
    D="python3 benchmarks/decode.py --device-memory 24GiB --decode 32 --graph"
    run qwen3_pipelined timeout 240 $D --pipeline --preset qwen3-30b-a3b --out "$OUT/decode_qwen3_pipelined.json"
    run qwen3_stepwise timeout 120 $D --no-ablations --preset qwen3-30b-a3b --out "$OUT/decode_qwen3_stepwise.json"
    run mixtral_pipelined timeout 170 $D --pipeline --no-ablations --preset mixtral-8x7b --out "$OUT/decode_mixtral_pipelined.json"
fi
if [ "$what" = copy ] || [ "$what" = defaults ]; then  # copy-mode misses: Mixtral with both miss paths
    [ "$what" = copy ] && run gpu_tests python3 -m pytest -p no:cacheprovider -q -m gpu -rA tests/test_gpu.py tests/test_backend_ops.py tests/test_gpu_memory.py
    D="python3 benchmarks/decode.py --device-memory 24GiB --decode 32 --graph --pipeline --no-ablations"
    run mixtral_auto_read timeout 330 $D --graph-misses auto,read --preset mixtral-8x7b --out "$OUT/decode_mixtral_auto_read.json"
    [ "$what" = defaults ] && run qwen3_auto timeout 150 $D --preset qwen3-30b-a3b --out "$OUT/decode_qwen3_auto.json"
fi
if [ "$what" = serve ]; then  # continuous batching: aggregate tokens/s against concurrency (issue: serving)
    run serve_gpu_tests timeout 150 python3 -m pytest -p no:cacheprovider -q -m gpu -rA tests/test_scheduler.py tests/test_checkpoint_changed.py
    stacked_step
    S="python3 benchmarks/serve_load.py --device cuda --device-memory 24GiB --routing generated --clusters 4 --prompt-len 16 --max-tokens 32 --per-client 2 --warmup 4"
    run serve_qwen3 timeout 360 $S --preset qwen3-30b-a3b --batching ${BATCHING:-stacked,stacked-fast} --concurrency ${CONCURRENCY:-1,4,16,32} --configs priority:on --out "$OUT/serve.jsonl"
    run serve_qwen3_ablations timeout 200 $S --preset qwen3-30b-a3b --concurrency 16 --configs priority:off,lru:on --out "$OUT/serve.jsonl"
    # Poisson arrivals: the rate at which p99 TPOT passes 2x batch-1 (printed, and tpot_p99_vs_batch1 in the rows).
    run serve_qwen3_poisson timeout 240 $S --preset qwen3-30b-a3b --concurrency 1 --rates 0.5,1,2,4 --poisson-requests 16 --configs priority:on --out "$OUT/serve.jsonl"
    run serve_mixtral timeout 240 $S --preset mixtral-8x7b --batching ${BATCHING:-stacked,stacked-fast} --concurrency 1,4,8 --configs priority:on --out "$OUT/serve.jsonl"
fi
if [ "$what" = serve-hybrid ]; then  # serving with the CPU taking misses: stacked exact and fast, synchronous kernel path, cpu_experts off and auto, one process
    run serve_qwen3_hybrid timeout 540 python3 benchmarks/serve_load.py --device cuda --device-memory 24GiB --routing generated --clusters 4 \
        --prompt-len 16 --max-tokens 32 --per-client 2 --warmup 4 --preset qwen3-30b-a3b --batching stacked,stacked-fast --concurrency 1,16 \
        --configs priority:on --mapped off --cpu-experts off,auto --measure-link --out "$OUT/serve_hybrid.jsonl"
fi
if [ "$what" = fp8 ]; then  # quantized experts: FP8 against bf16 on the same routing, same run
    run fp8_gpu_tests timeout 120 python3 -m pytest -p no:cacheprovider -q -m gpu -rA -k "fp8" tests/test_gpu.py
    run qwen3_bf16_fp8 timeout 400 python3 benchmarks/decode.py --preset qwen3-30b-a3b --device-memory 24GiB --decode 32 \
        --routing generated --no-ablations --expert-dtype bf16,fp8 --quantized-kernels --graph --out "$OUT/decode_qwen3_bf16_fp8.json"
fi
if [ "$what" = hybrid ]; then  # CPU compute of misses against the link alone, both shapes, measured link rates
    run hybrid_qwen3_graph timeout 110 $H --device-memory 24GiB --cpu-experts off,auto,12 --graph --graph-misses copy --preset qwen3-30b-a3b --out "$OUT/hybrid_qwen3_graph.json"
    eager_hybrid 120
    run hybrid_mixtral_graph timeout 180 $H --device-memory 24GiB --cpu-experts off,auto,12 --graph --graph-misses copy --preset mixtral-8x7b --out "$OUT/hybrid_mixtral_graph.json"
    # A 12 GB card's worth: the issue expects the gain to grow as the cache shrinks.
    run hybrid_mixtral_8g timeout 120 $H --device-memory 8GiB --cpu-experts off,auto --graph --graph-misses copy --preset mixtral-8x7b --out "$OUT/hybrid_mixtral_8g.json"
    if [ -x build/cpuffn.test ]; then
        run cpuffn_bench timeout 50 build/cpuffn.test -test.run XXX -test.bench 'FFN|ReadBandwidth' -test.benchtime 10x
    fi
fi
if [ "$what" = gptoss ]; then  # the gpt-oss kernels (bf16 and MXFP4) against transformers and the CPU reference
    run gptoss_gpu_tests timeout 300 python3 -m pytest -p no:cacheprovider -q -m gpu -rA -s -k "gpt_oss" tests/test_gpu.py
fi
if [ "$what" = gptoss-bench ]; then  # gpt-oss-120b's shape with MXFP4 experts: views, then the kernels
    G="python3 benchmarks/decode.py --preset gpt-oss-120b --device-memory 24GiB --decode 32 --routing generated --no-ablations"
    run gptoss120b_views timeout 280 $G --out "$OUT/decode_gptoss120b_views.json"
    run gptoss120b_kernels timeout 280 $G --quantized-kernels --out "$OUT/decode_gptoss120b_kernels.json"
fi
if [ "$what" = fp8-sm89 ]; then  # the sm89 kernel build against sm80: same bits, and the decode speed of each
    ptxas_sm89
    run fp8_sm89_gpu_tests timeout 200 python3 -m pytest -p no:cacheprovider -q -m gpu -rA -k "fp8 or kernel_build" tests/test_gpu.py
    fp8_sm80_sm89 380
fi
if [ "$what" = pending ] || [ "$what" = pending-short ]; then  # what the eighth session prepared and could not run, in one call (~9.5 minutes; pending-short ~5.5: the tests and the eager run)
    ptxas_sm89
    # sm89 bits, FP8 on the kernels by default, the gpt-oss kernels, hybrid parity on every kernel family.
    run pending_gpu_tests timeout 200 python3 -m pytest -p no:cacheprovider -q -m gpu -rA -s -k \
        "fp8_kernel_builds or kernel_build or fp8_kernel_teacher or gpt_oss_kernel_teacher or gpt_oss_cuda_kernels or hybrid_teacher or kernel_crossover" tests/test_gpu.py
    eager_hybrid 110
    [ "$what" = pending-short ] && stacked_step  # (pending has no time left for it within one call)
    if [ "$what" = pending ]; then
        fp8_sm80_sm89 170
        # The SIMD FFN's worker pool (branch cpuffn-pool) against main's goroutines (cpuffn_gor),
        # alternated, where both binaries came.
        for b in gor pool gor pool; do
            [ -x "build/cpuffn_$b.test" ] && run "cpuffn_$b" timeout 22 "build/cpuffn_$b.test" -test.run XXX \
                -test.bench 'FFN/(qwen3_2048x768_top[12]|fixed|mixtral_4096x14336_top2)/T(1|4)$' -test.benchtime 20x
        done
    fi
fi
if [ "$what" = margin ]; then  # admission margin 4 against the default, both shapes
    D="python3 benchmarks/decode.py --device-memory 24GiB --decode 32 --graph --pipeline --no-ablations"
    run qwen3_margin4 timeout 150 $D --admit-margin 4 --preset qwen3-30b-a3b --out "$OUT/decode_qwen3_margin4.json"
    run mixtral_margin4 timeout 170 $D --admit-margin 4 --preset mixtral-8x7b --out "$OUT/decode_mixtral_margin4.json"
fi
if [ "$what" = profile ]; then  # copy mode's waits split into copying and idle (torch profiler), Mixtral
    run profile_mixtral timeout 300 python3 benchmarks/profile_step.py --preset mixtral-8x7b --device-memory 24GiB \
        --decode 8 --pipelined-only --out "$OUT/profile_mixtral.json"
fi
if [ "$what" = variants ]; then  # the same run with each build in $VARIANTS (directories from build_variants.sh), one machine
    for v in ${VARIANTS:?set VARIANTS to directories that hold a libmoe_infinity_cuda.so each}; do
        name=$(basename "$v")
        # A variant with its own python/ and benchmarks/ runs them (its
        # revision's runtime and scheduler), else the checkout's.
        py=$PWD/python bench=benchmarks
        [ -d "$v/python" ] && py=$PWD/$v/python
        [ -d "$v/benchmarks" ] && bench=$v/benchmarks
        # The variant's library and Python, for one run (name, command...).
        vrun() { PYTHONPATH=$py${PYTHONPATH#$PWD/python} MOE_INFINITY_LIB=$PWD/$v/libmoe_infinity_cuda.so run "$@"; }
        case "${VARIANT_RUN:-decode}" in
        serve)  # the serve regression's bisect: stacked exact, 1 and 16 clients
            vrun "serve_$name" timeout 170 \
                python3 "$bench/serve_load.py" --device cuda --device-memory 24GiB --routing generated --clusters 4 --prompt-len 16 \
                --max-tokens 32 --per-client 2 --warmup 4 --preset qwen3-30b-a3b --batching stacked --concurrency 1,16 \
                --configs priority:on --out "$OUT/serve_$name.jsonl" ;;
        hybrid)  # the CPU's misses: the Qwen3 graph rows, cpu_experts off and auto
            vrun "hybrid_$name" timeout 120 \
                python3 "$bench/decode.py" --device-memory 24GiB --decode 32 --routing generated --no-ablations --measure-link \
                --cpu-experts off,auto --graph --graph-misses copy --preset qwen3-30b-a3b --out "$OUT/hybrid_qwen3_$name.json" ;;
        *)
            vrun "mixtral_$name" timeout 200 \
                python3 "$bench/decode.py" --device-memory 24GiB --decode 32 --graph --pipeline --no-ablations --preset mixtral-8x7b \
                --out "$OUT/decode_mixtral_$name.json" ;;
        esac
    done
fi
echo "== summary"
cat "$OUT/summary.txt"
grep -hE "passed|failed|error" "$OUT"/*.log | grep -E "^[0-9]+ (passed|failed)|=+ .*(passed|failed)" || true
exit $status
