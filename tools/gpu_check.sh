#!/usr/bin/env bash
# One run on a machine with a real GPU (the device tool's lent H100/H200, minutes only): the Vulkan
# subset on the GPU, then the engine's speed there beside the CPU backend of the same binary.
# Needs the Vulkan build and the models already present (carry target/vulkan and the models; the
# lent machine has no network). Usage: tools/gpu_check.sh [MODEL...]; prints markdown tables.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/vulkan/release/ccsm-infer
[ -x "$bin" ] || { echo "build first: make build-vulkan" >&2; exit 1; }
unset GGML_VK_VISIBLE_DEVICES   # the GPU is Vulkan0; lavapipe stays hidden
"$bin" system
test_bin=$(ls -t target/vulkan/release/deps/device-* 2>/dev/null | grep -v '\.d$' | head -1 || true)
failed=0
if [ -n "$test_bin" ]; then CCSM_REQUIRE_VULKAN=1 "$test_bin" --test-threads=1 || { echo "device tests FAILED"; failed=1; }; fi
for model in "${@:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"; do
    [ -f "$model" ] || { echo "skipped $model (missing)"; continue; }
    case "$(basename "$model")" in
        csm*) args=(-p 64 -n 32 -r 2 --kv-quant f16,q8_0,q4_0) ;;
        *) args=(-p 512 -n 128 -r 3 --kv-quant f16,q8_0,q4_0,q4_1) ;;
    esac
    for device in vulkan cpu; do "$bin" bench "$model" --device "$device" "${args[@]}" -q; done
done
exit $failed
