#!/usr/bin/env bash
# One family, one command: build its real-shaped random-weight checkpoint (once), compile
# the vlmc q4 artifact (once), then compare.py against mlx-vlm and transformers float32
# (and llama.cpp, given compare.py's --llama-cpp-* options: README section 3b).
#
#   benchmarks/compare_family.sh NAME [compare.py options...]
#
# NAME: a make_checkpoint.py name (idefics3 = SmolVLM-256M, smolvlm_500m, qwen3_vl,
# gemma3, qwen2_vl, ...). Environment: BENCH_DIR (default /tmp/vlmc-bench: checkpoints,
# artifacts, results), PYTHON (with vlmc, torch and transformers; default python3),
# MLX_VLM_PYTHON (a venv with mlx-vlm; unset skips mlx-vlm). Later options override the
# defaults below (argparse keeps the last value).
set -euo pipefail
name=${1:?usage: compare_family.sh NAME [compare.py options...]}
shift
here=$(cd "$(dirname "$0")" && pwd)
dir=${BENCH_DIR:-/tmp/vlmc-bench}
py=${PYTHON:-python3}
ckpt=$dir/$name
art=$dir/$name-q4
mkdir -p "$dir"
export PYTHONPATH="$here/..${PYTHONPATH:+:$PYTHONPATH}"
[ -f "$ckpt/config.json" ] || "$py" "$here/make_checkpoint.py" "$name" "$ckpt"
[ -f "$art/manifest.json" ] || "$py" -m vlmc.cli compile "$ckpt" -o "$art" -q q4
mlx=()
[ -n "${MLX_VLM_PYTHON:-}" ] && mlx=(--mlx-vlm-python "$MLX_VLM_PYTHON")
exec "$py" "$here/compare.py" "$ckpt" --vlmc-artifact "$art" "${mlx[@]}" \
    --prompt-tokens 128 --decode-tokens 32 --image-size 448 --runs 1 --rounds 3 --image-rounds 1 \
    --json "$dir/$name.json" "$@"
