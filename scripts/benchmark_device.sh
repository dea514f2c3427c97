#!/usr/bin/env bash
# Ours beside the PyTorch peer in one call, printed as one table (README "Speed" explains the columns).
#   scripts/benchmark_device.sh          one GPU, about 8 minutes: edit 512^2 / 20 steps at batch 1 and 16,
#                                        train 256^2 batch 64 (cached latents and live VAE), diffusers
#                                        eager and torch.compile on the same shapes
#   scripts/benchmark_device.sh --demo   anywhere (the CPU figure): the shipped demo model, batches 1/4/16
#   scripts/benchmark_device.sh --tiny   a check of the script on CPU (tiny random models, seconds)
# Every stage has its own time limit, so one slow stage cannot eat the others' time. JSON lines go
# to $OUT_DIR (default bench_out/); PY picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT_DIR:-bench_out}
MODE=${1:-device}
mkdir -p "$OUT" && rm -f "$OUT"/*.jsonl
# The GPU flags under test (README "Speed"): CUDA-graph command buffers that also take in the
# sampling while loop, and the latency-hiding scheduler. Timed as a variant of our edit, not set
# anywhere else until a run shows they help.
GPU_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL \
--xla_gpu_enable_latency_hiding_scheduler=true"

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.jsonl" 2> "$OUT/$name.log"
  local rc=$?
  echo "$name: exit $rc, $((SECONDS - t0)) s" >&2
  [ $rc -eq 0 ] || tail -3 "$OUT/$name.log" >&2
}

case "$MODE" in
  --tiny)
    stage ours_edit 300 "$PY" scripts/benchmark_edit.py --tiny --repeats 1
    XLA_FLAGS="${XLA_FLAGS:-} $GPU_FLAGS" stage ours_edit_flags 300 "$PY" scripts/benchmark_edit.py --tiny \
      --repeats 1 --batches 1 --label "ip2p_jax +GPU flags"
    stage peer_edit 300 "$PY" scripts/peer_edit.py --tiny --repeats 1
    stage ours_train 300 "$PY" scripts/benchmark_train.py --tiny --batches 2 --steps 2
    stage peer_train 300 "$PY" scripts/peer_train.py --tiny --batches 2 --steps 2 ;;
  --demo)
    stage ours_edit 900 "$PY" scripts/benchmark_edit.py --model ip2p_jax/demo_model --batches 1,4,16
    stage peer_edit 900 "$PY" scripts/peer_edit.py --model ip2p_jax/demo_model --batches 1,4,16 ;;
  device)
    stage ours_edit 100 "$PY" scripts/benchmark_edit.py --batches 1,16
    XLA_FLAGS="${XLA_FLAGS:-} $GPU_FLAGS" stage ours_edit_flags 45 "$PY" scripts/benchmark_edit.py --batches 1 \
      --label "ip2p_jax +GPU flags"
    stage peer_edit 50 "$PY" scripts/peer_edit.py --batches 1,16
    stage peer_edit_compiled_1 65 "$PY" scripts/peer_edit.py --batches 1 --compile --repeats 2
    stage peer_edit_compiled_16 75 "$PY" scripts/peer_edit.py --batches 16 --compile --repeats 2
    stage ours_train_cached 50 "$PY" scripts/benchmark_train.py --res 256 --batches 64 --cached
    stage ours_train 50 "$PY" scripts/benchmark_train.py --res 256 --batches 64
    stage peer_train 45 "$PY" scripts/peer_train.py --res 256 --batches 64 ;;
  *) echo "usage: $0 [--tiny|--demo]" >&2; exit 2 ;;
esac
"$PY" scripts/benchmark_table.py "$OUT"/*.jsonl
