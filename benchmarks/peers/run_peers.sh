#!/usr/bin/env bash
# llama.cpp (--n-cpu-moe swept) beside moe_infinity (benchmarks/decode.py) on
# the same host, model shape and weights. On the GPU machine, in two calls of
# the device tool on one warm machine (each stage fits one call's 10 minutes;
# together they may not):
#
#   bash benchmarks/peers/run_peers.sh prepare   # build llama.cpp (CUDA, sm_90) while the GGUF is written
#   bash benchmarks/peers/run_peers.sh bench     # llama-bench sweep, then decode.py; summary table
#   bash benchmarks/peers/run_peers.sh all       # both in one call, bench only if time is left
#
# Carry (git-ignored): build/peers/llama.cpp.tar.xz and .whl/ (made by
# prepare_llamacpp.sh), build/libmoe_infinity_cuda.so (make cuda). A second
# call on the same warm machine finds the llama.cpp build and the GGUF under
# build/peers/ and skips making them again; a stage cut off by the deadline
# resumes where it stopped (ninja; the GGUF is written to .part first), and
# so does bench: a setting or decode.py run whose JSON is there is not run
# again, so a second "bench" call finishes a sweep the deadline cut short.
#
# Environment (defaults): PRESET (qwen3-30b-a3b; tiny and mixtral-8x7b too),
# DEVICE_MEMORY (24GiB: moe_infinity's budget, and the GPU peak a llama.cpp
# setting must stay within to count), NCMOE (the --n-cpu-moe values, one
# llama-bench process each), THREADS (the host's cores), PROMPT (512), GEN
# (128), REPS (3), MI_DTYPES (the decode.py runs, in order: "fp8 bf16";
# fp8 pairs with Q8_0, bf16 is the second row), MI_ARGS (extra decode.py
# options, e.g. for CPU experts), DEADLINE (540 s for this call), OUT (results:
# $OUT/peers; build/peers/out without the device tool). On a host without
# nvidia-smi it builds and runs on the CPU (how the tiny preset is checked).
#
# Disk: the Qwen3-30B-A3B GGUF is ~32 GB, Mixtral-8x7B's ~50 GB; both do not
# fit the GPU machine's 64 GiB, so prepare deletes the other presets' GGUFs.
set -uo pipefail
cd "$(dirname "$0")/../.."
what=${1:-all}
START=$(date +%s)
DEADLINE=${DEADLINE:-540}
left() { echo $((DEADLINE - ($(date +%s) - START))); }
# limit KEEP: seconds a step may run, keeping KEEP for what follows (at least 5:
# timeout 0 would mean no limit).
limit() { local s=$(($(left) - $1)); [ "$s" -lt 5 ] && s=5; echo "$s"; }
PRESET=${PRESET:-qwen3-30b-a3b}
OUT=${OUT:-build/peers/out}
R="$OUT/peers"
mkdir -p "$R"
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    DEV=cuda CUDA=ON
    LIB=${MOE_INFINITY_LIB:-$PWD/build/libmoe_infinity_cuda.so}
else
    DEV=cpu CUDA=OFF
    LIB=${MOE_INFINITY_LIB:-$PWD/build/libmoe_infinity.so}
fi
THREADS=${THREADS:-$(nproc)}
MEM=${DEVICE_MEMORY:-24GiB}
PROMPT=${PROMPT:-512}
GEN=${GEN:-128}
REPS=${REPS:-3}
MI_DTYPES=${MI_DTYPES:-fp8 bf16}
case "$PRESET" in
    qwen3-30b-a3b) NCMOE=${NCMOE:-"12 14 16 20 24 32 48 0"} ;;  # 48 MoE layers, ~0.64 GB of Q8_0 experts each
    mixtral-8x7b) NCMOE=${NCMOE:-"16 18 20 24 32 0"} ;;         # 32 MoE layers, ~1.5 GB each
    *) NCMOE=${NCMOE:-"0 2 4"} ;;
esac
GGUF=build/peers/$PRESET-q8_0.gguf
BIN=build/peers/llama.cpp/build/bin/llama-bench
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "${SITE:-/tmp/site}" .whl/*.whl
    export PYTHONPATH=${SITE:-/tmp/site}
fi
export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
export MOE_INFINITY_LIB=$LIB PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
status=0

{
    date -u
    echo "preset=$PRESET device=$DEV threads=$THREADS device_memory=$MEM prompt=$PROMPT gen=$GEN reps=$REPS ncmoe=$NCMOE"
    [ "$DEV" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    nproc; free -g | head -2; df -h build | tail -1
    grep -m1 'model name' /proc/cpuinfo
    python3 -c "import torch, transformers, numpy, yaml, tqdm, gguf; print('torch', torch.__version__, 'transformers', transformers.__version__, 'numpy', numpy.__version__, 'gguf ok')"
    [ -f build/peers/llama.cpp/PEERS_VERSION ] && cat build/peers/llama.cpp/PEERS_VERSION
} 2>&1 | tee -a "$R/env.txt"
python3 -c "import gguf, numpy, yaml, tqdm" || { echo "run_peers: gguf or its dependencies missing: carry .whl/ (prepare_llamacpp.sh puts gguf there)" >&2; exit 2; }

# gpu_peak FILE CMD...: runs CMD; writes FILE.gpu_peak_mib, the peak of
# nvidia-smi's memory.used while it ran minus the reading before it.
gpu_peak() {
    local file=$1
    shift
    if [ "$DEV" != cuda ]; then
        "$@"
        return
    fi
    local base
    base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0)
    : > "$file.samples"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 -lms 100 >> "$file.samples" &
    local sampler=$!
    "$@"
    local rc=$?
    kill "$sampler" 2>/dev/null
    wait "$sampler" 2>/dev/null
    { echo "$base"; cat "$file.samples"; } | sort -n | tail -1 | awk -v b="$base" '{print $1 - b}' > "${file%.json}.gpu_peak_mib"
    rm -f "$file.samples"
    return $rc
}

prepare() {
    local t0 build_pid=
    t0=$(date +%s)
    if [ ! -x "$BIN" ] || [ ! -f build/peers/build_info.txt ]; then
        timeout $(limit 20) env LLAMACPP_CUDA=$CUDA bash benchmarks/peers/build_llamacpp.sh > "$R/build_llamacpp.log" 2>&1 &
        build_pid=$!
    fi
    if [ ! -f "$GGUF" ]; then
        for other in build/peers/*-q8_0.gguf build/peers/*.gguf.part; do
            [ -e "$other" ] && [ "$other" != "$GGUF" ] && echo "prepare: deleting $other (disk)" && rm -f "$other"
        done
        if timeout $(limit 20) python3 benchmarks/peers/write_gguf.py --preset "$PRESET" --device "$DEV" --out "$GGUF.part" \
            --info "$R/gguf_$PRESET.json" > "$R/write_gguf_$PRESET.log" 2>&1; then
            mv "$GGUF.part" "$GGUF"
        else
            echo "prepare: write_gguf failed or ran out of time (see write_gguf_$PRESET.log)"
            tail -5 "$R/write_gguf_$PRESET.log"
            status=1
        fi
    fi
    if [ -n "$build_pid" ]; then
        if ! wait "$build_pid"; then
            echo "prepare: the llama.cpp build failed or ran out of time; run prepare again to resume (see build_llamacpp.log)"
            tail -15 "$R/build_llamacpp.log"
            status=1
        fi
    fi
    cp build/peers/build_info.txt "$R/" 2>/dev/null
    ls -l "$GGUF" "$BIN" 2>&1
    df -h build | tail -1
    echo "prepare: $(($(date +%s) - t0)) s"
}

bench() {
    [ -x "$BIN" ] && [ -f "$GGUF" ] || { echo "bench: needs $BIN and $GGUF: run prepare first"; status=1; return; }
    local n_mi=0 dt
    for dt in $MI_DTYPES; do [ -s "$R/moe_infinity_${PRESET}_$dt.json" ] || n_mi=$((n_mi + 1)); done
    # seconds kept for each decode.py still to run (build ~20 s, load, FP8 compression, capture, runs)
    local reserve=$((n_mi * ${MI_RESERVE:-150}))
    [ "$DEV" = cpu ] && reserve=$((n_mi * ${MI_RESERVE:-60}))
    for n in $NCMOE; do
        local f="$R/llamacpp_${PRESET}_ncmoe$n.json"
        if grep -q avg_ts "$f" 2>/dev/null; then
            echo "bench: $f exists: --n-cpu-moe $n already measured (delete it to measure again)"
            continue
        fi
        if [ "$(left)" -lt $((reserve + 45)) ]; then
            echo "bench: skipping --n-cpu-moe $n and later: $(left) s left, $reserve kept for moe_infinity; run 'run_peers.sh bench' again (measured settings are kept)"
            status=1
            break
        fi
        echo "== llama-bench --n-cpu-moe $n"
        # -ngl 99: every layer on the GPU except the experts --n-cpu-moe keeps
        # on the CPU; -fa 1: flash attention, as llama.cpp advises for MoE offload.
        gpu_peak "$f" timeout $(limit "$reserve") "$BIN" -m "$GGUF" -ngl 99 -ncmoe "$n" -fa 1 -t "$THREADS" \
            -p "$PROMPT" -n "$GEN" -r "$REPS" -o json > "$f" 2> "${f%.json}.log" || { echo "llama-bench -ncmoe $n failed:"; tail -5 "${f%.json}.log"; status=1; }
        [ -f "${f%.json}.gpu_peak_mib" ] && echo "   GPU peak $(cat "${f%.json}.gpu_peak_mib") MiB"
    done
    # moe_infinity: FP8 experts first (the pairing with Q8_0: both 8-bit;
    # the GPU's FP8 kernels), then bf16 experts as a second row, both at
    # their best (CUDA-graph replays of mapped steps, pipelined).
    local dt
    for dt in $MI_DTYPES; do
        local m="$R/moe_infinity_${PRESET}_$dt.json"
        if [ -s "$m" ]; then
            echo "bench: $m exists: moe_infinity $dt already measured (delete it to measure again)"
            continue
        fi
        if [ "$(left)" -lt 60 ]; then
            echo "bench: skipping moe_infinity $dt: $(left) s left; run 'run_peers.sh bench' again (measured settings are kept)"
            status=1
            continue
        fi
        local opts=(--expert-dtype "$dt")
        if [ "$DEV" = cuda ]; then
            opts+=(--graph --pipeline)
            [ "$dt" = fp8 ] && opts+=(--quantized-kernels)
        fi
        echo "== moe_infinity decode.py --device-memory $MEM ${opts[*]} ${MI_ARGS:-}"
        # shellcheck disable=SC2086
        gpu_peak "$m" timeout $(limit 10) python3 benchmarks/decode.py --preset "$PRESET" --device "$DEV" --device-memory "$MEM" \
            --prompt-len "$PROMPT" --decode "$GEN" --no-ablations "${opts[@]}" ${MI_ARGS:-} --json --out "$m" > "${m%.json}.log" 2>&1 \
            || { echo "decode.py ($dt) failed:"; tail -15 "${m%.json}.log"; rm -f "$m"; status=1; }
    done
    python3 benchmarks/peers/summarize.py "$R" --budget-gib "${MEM%GiB}" | tee "$R/summary.txt"
}

case "$what" in
    prepare) prepare ;;
    bench) bench ;;
    all)
        prepare
        if [ "$(left)" -gt 240 ]; then bench; else echo "run_peers: $(left) s left: run 'run_peers.sh bench' in the next call"; fi
        ;;
    *) echo "usage: run_peers.sh [prepare|bench|all]" >&2; exit 2 ;;
esac
echo "run_peers: $what done in $(($(date +%s) - START)) s, status $status"
exit $status
