#!/usr/bin/env bash
# GPU checks for vlmc's CUDA kernels with MLX's CUDA backend (run on a machine with an
# NVIDIA GPU, from the repository root; results under $OUT, default ./gpu-check).
#
#   MLX_WHEELS="mlx-*.whl mlx_cuda_13-*.whl" benchmarks/gpu_check.sh
#
# 1. installs the given MLX wheels (offline) unless `import mlx` already sees CUDA;
# 2. runs tests/test_gpu_kernels.py (every kernel against its MLX reference);
# 3. times the kernels (benchmarks/gpu_kernels.py);
# 4. end to end, if time allows: a Qwen2-VL-2B-shaped random checkpoint compiled for
#    --target cuda in bf16, `vlmc bench` without and with the (opt-in) add_norm fusion, and
#    `vlmc bench --context` for dense, 4-bit and TurboQuant 3.5-bit KV caches (32000, not
#    32768: the model's maximum context must also hold the decode steps).
# KV_ONLY=1 keeps to the KV-cache work: kernel tests, gpu_kv_step.py at 32k, and the
# --context benches (no kernel timings, no add_norm builds).
# ACT_QUANT=1 adds mxfp8 and nvfp4 artifacts with and without --quantize-activations
# (whether MLX's qqmm runs on this GPU, and the prefill/decode cost of each);
# SKIP_TIMINGS=1, SKIP_ADDNORM=1 and SKIP_CONTEXT=1 leave out those parts.
set -u
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null)"
if ! $PY -c "import mlx.core as mx, sys; sys.exit(0 if mx.cuda.is_available() else 1)" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile ${MLX_WHEELS:?set MLX_WHEELS to the MLX CUDA wheels} || exit 1
fi
$PY -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device(), mx.device_info())" || exit 1
echo "== kernel tests"
$PY -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py -rs 2>&1 | tee "$OUT/pytest.txt" | tail -25
if [ "${KV_ONLY:-0}" = 1 ]; then
  echo "== KV step at 32000 tokens"
  $PY benchmarks/gpu_kv_step.py --context 32000 --json "$OUT/kv_step.json"
elif [ "${SKIP_TIMINGS:-0}" != 1 ]; then
  echo "== kernel timings"
  $PY benchmarks/gpu_kernels.py --json "$OUT/gpu_kernels.json"
fi
[ "${SKIP_E2E:-0}" = 1 ] && exit 0
echo "== end to end: Qwen2-VL-2B shapes, bf16, --target cuda"
CK=/tmp/vlmc-ck ART=/tmp/vlmc-art
${TF_PY:-$PY} benchmarks/make_checkpoint.py qwen2_vl "$CK" --dtype bfloat16 || exit 1
$PY -m vlmc.cli compile "$CK" -o "$ART" --target cuda --dtype bfloat16 || exit 1
if [ "${KV_ONLY:-0}" != 1 ]; then
  arts="$ART:default"
  if [ "${SKIP_ADDNORM:-0}" != 1 ]; then
    $PY -m vlmc.cli compile "$CK" -o "$ART-addnorm" --target cuda --dtype bfloat16 --fuse add_norm || exit 1
    arts="$arts $ART-addnorm:addnorm"
  fi
  if [ "${ACT_QUANT:-0}" = 1 ]; then
    $PY -c "from vlmc.kernels import gpu_ops as g; print('qqmm runs here:', {m: g.block_scaled_matmul(m) for m in ('mxfp8', 'nvfp4')})"
    for s in mxfp8 nvfp4; do
      $PY -m vlmc.cli compile "$CK" -o "$ART-$s" --target cuda --dtype bfloat16 -q $s || exit 1
      $PY -m vlmc.cli compile "$CK" -o "$ART-$s-act" --target cuda --dtype bfloat16 -q $s --quantize-activations || exit 1
      arts="$arts $ART-$s:$s $ART-$s-act:$s-act"
    done
  fi
  for a in $arts; do
    $PY -m vlmc.cli bench "${a%%:*}" --prompt-lengths 128,2048 --decode-tokens 64 --runs ${BENCH_RUNS:-3} --json "$OUT/bench-${a##*:}.json"
  done
fi
[ "${SKIP_CONTEXT:-0}" = 1 ] && { echo "== done $(date -u +%FT%TZ)"; exit 0; }
$PY -m vlmc.cli bench "$ART" --context 4096,16384,32000 --decode-tokens 32 --json "$OUT/ctx-dense.json"
$PY -m vlmc.cli bench "$ART" --context 4096,16384,32000 --decode-tokens 32 --kv-bits 4 --json "$OUT/ctx-q4.json"
$PY -m vlmc.cli bench "$ART" --context 4096,16384,32000 --decode-tokens 32 --kv-bits 3.5 \
  --kv-quant-scheme turboquant --json "$OUT/ctx-turbo3.5.json"
echo "== done $(date -u +%FT%TZ)"
