#!/usr/bin/env bash
# The GPU measurements of issues #15 and #16 in one scripted run on a lent H200 (the device tool),
# from a CUDA wheel and GPU test binary built here (`scripts/build_wheel.sh --cuda --tests`) and the
# tiny fixture, all carried in one folder:
#   CARRY/glm2rs-*.whl  CARRY/cuda-decode-test(.gz)  CARRY/tiny-glm2/
#   bash benches/gpu_session.sh CARRY [kernels|prefill|serving|all]
# Writes every log and JSON under $OUT (the device tool's result folder; ./gpu-out otherwise) and
# prints the lines that matter. Steps: kernels (tests/cuda_decode.rs: decode kernels and both flash
# prefill kernels against float64; wgmma is turned off for the rest when they fail), prefill
# (long_context.py with transformers' SDPA side by side, batches 64 x 4K and 256 x 512, 8K chunked
# == whole), serving (load_test.py on the 6B: 32 x 10 turns, 64 conversations of 8K tokens, and 32 x
# 2K x 3 turns in 1 GiB of KV memory).
set -u
CARRY="${1:?usage: gpu_session.sh CARRY [kernels|prefill|serving|all]}"
WHAT="${2:-all}"
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
pip install -q --no-deps --target /tmp/site-glm2rs "$CARRY"/glm2rs-*.whl 2>&1 | grep -v WARN | tail -1
export PYTHONPATH=/tmp/site-glm2rs GLM2RS_FIXTURES="$CARRY/tiny-glm2" PYTHONUNBUFFERED=1
t0=$(date +%s)
step() { echo "== $1 $(( $(date +%s) - t0 )) s"; }
ckpt() { [ -f /tmp/glm6b/config.json ] || python3 benches/make_random_checkpoint.py /tmp/glm6b --dtype bfloat16 --fixtures "$CARRY/tiny-glm2" > /dev/null; }
if [ "$WHAT" = kernels ] || [ "$WHAT" = all ]; then
    step kernels
    LIBS=$(for l in libcudart.so.13 libcublas.so.13 libcurand.so.10; do dirname "$(find / -name $l -not -path "/proc/*" 2>/dev/null | head -1)"; done | sort -u | tr '\n' ':')
    if [ -f "$CARRY/cuda-decode-test.gz" ]; then gunzip -c "$CARRY/cuda-decode-test.gz" > /tmp/cuda-decode-test; else cp "$CARRY/cuda-decode-test" /tmp/; fi
    chmod +x /tmp/cuda-decode-test
    LD_LIBRARY_PATH="$LIBS${LD_LIBRARY_PATH:-}" timeout 200 /tmp/cuda-decode-test --nocapture --test-threads 1 > "$OUT/kernel_tests.txt" 2>&1
    rc=$?
    grep "test result" "$OUT/kernel_tests.txt"; grep "case 0 .*wgmma true\|panicked" "$OUT/kernel_tests.txt" | cut -c1-200
    if [ $rc -ne 0 ]; then export GLM2RS_WGMMA=0; echo "KERNEL TESTS FAILED: GLM2RS_WGMMA=0 for the rest"; fi
fi
if [ "$WHAT" = prefill ] || [ "$WHAT" = all ]; then
    step prefill; ckpt
    timeout 300 python3 benches/long_context.py --fixtures "$CARRY/tiny-glm2" --ckpt /tmp/glm6b --hf \
        --batch 64x4096,256x512 --decode 64 --chunked 1024 --out "$OUT/long_context.json" > "$OUT/long_context.txt" 2>&1
    grep "short\|bf16 2048\|bf16 8192\|bf16 32000\|batch\|chunks of 1024\|^| [0-9]" "$OUT/long_context.txt" | cut -c1-260
fi
if [ "$WHAT" = serving ] || [ "$WHAT" = all ]; then
    step serving; ckpt
    L="python3 benches/load_test.py --model /tmp/glm6b --device cuda --dtype bfloat16"
    timeout 120 $L --turns 10 --clients 32 --max-tokens 32 --json "$OUT/multiturn.json" > "$OUT/multiturn.txt" 2>&1
    echo "32 x 10 turns: rc $?"; grep "^| 1 \|^| 10 \|turn 10 /\|preempt\|in every turn" "$OUT/multiturn.txt"
    # the answers with and without the cache, in float32 (bfloat16 sums in a batch-dependent order
    # leave near-ties of random weights to chance)
    timeout 150 $L --turns 10 --clients 32 --max-tokens 32 --dtype float32 --json "$OUT/multiturn_f32.json" \
        > "$OUT/multiturn_f32.txt" 2>&1
    echo "32 x 10 turns, float32: rc $?"; grep "turn 10 /\|in every turn" "$OUT/multiturn_f32.txt"
    timeout 150 $L --turns 2 --clients 64 --max-tokens 32 --history-tokens 8000 --json "$OUT/long64.json" > "$OUT/long64.txt" 2>&1
    echo "64 x 8K: rc $?"; grep "^| [12] \|turn 2 /\|preempt\|rror" "$OUT/long64.txt" | tail -6
    timeout 120 $L --turns 3 --clients 32 --max-tokens 32 --history-tokens 2000 --kv-cache-memory 1GiB \
        --json "$OUT/overflow.json" > "$OUT/overflow.txt" 2>&1
    echo "32 x 2K x 3 turns in 1 GiB: rc $?"; grep "^| [13] \|turn 3 /\|preempt\|rror" "$OUT/overflow.txt" | tail -6
fi
step done
