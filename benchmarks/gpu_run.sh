#!/usr/bin/env bash
# The prepared GPU measurement: one CE-PO step at Qwen2.5-1.5B's shape (benchmarks/gpu_step.py: bf16,
# LoRA r = 16, G = 8, 512 new tokens, K = 4, then the largest coherence micro-batch), the memory model's
# prediction for it, and a 3-step `cepo fit` of the same shape (configs/experiments/gpu_1.5b_cepo.yaml:
# bf16-mixed, the cepo preset, scorer.micro_batch_size: auto). Everything lands in $OUT: gpu_step.json
# and .log, memory_model.txt, fit.json and .log, environment.txt, and results.md / results.json (per-phase
# seconds, tokens per second, peak memory, largest coherence micro-batch).
#
#   bash benchmarks/gpu_run.sh --fetch-wheels    # on a machine with PyPI access: the wheels cepo needs
#                                                # beyond torch/lightning/transformers/peft, into .wheels/
#   OUT=runs/gpu bash benchmarks/gpu_run.sh      # on the GPU machine (no network): about 6 minutes;
#                                                # run it under a 420 s limit, each step has its own
#   CEPO_GPU_DRY_RUN=1 OUT=/tmp/dry bash benchmarks/gpu_run.sh   # the same steps on the CPU, tiny shape
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python}

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    # Pure-Python wheels at the versions installed here (the GPU machine lacks jsonargparse and its
    # signature extras); pip installs them there with --no-index.
    versions=$($PYTHON - <<'EOF'
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in ("jsonargparse", "docstring-parser", "typeshed-client")))
EOF
)
    # shellcheck disable=SC2086
    $PYTHON -m pip download --no-deps --only-binary=:all: -d .wheels $versions
    ls .wheels
    exit 0
fi

OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
if ! $PYTHON -c "import jsonargparse, docstring_parser, typeshed_client" 2>/dev/null; then
    if ! ls .wheels/jsonargparse-*.whl >/dev/null 2>&1; then
        echo "jsonargparse is not installed and .wheels/ holds no wheel of it: run" \
             "'bash benchmarks/gpu_run.sh --fetch-wheels' on a machine with PyPI access and bring .wheels/ along" >&2
        exit 2
    fi
    $PYTHON -m pip install --no-index --find-links .wheels jsonargparse docstring-parser typeshed-client
fi

if [[ -n "${CEPO_GPU_DRY_RUN:-}" ]]; then
    # Every step of the real run on the CPU at a tiny shape, in seconds: checks the script, not the GPU.
    STEP=(--tiny --device cpu)
    SHAPE=tiny
    FIT=(--trainer.accelerator cpu --trainer.max_steps 1 --model.init_args.generation.max_new_tokens 8
         --model.init_args.group_size 2 --data.prompts_per_step 2)
    STEP_LIMIT=900 FIT_LIMIT=900  # a loaded CPU is slow; the GPU limits are below
else
    STEP=(--shape 1.5b --time-budget 120)
    SHAPE=1.5b
    FIT=()
    STEP_LIMIT=200 FIT_LIMIT=180
fi

{
    date -u
    $PYTHON -c "import torch, lightning, transformers, peft; print('torch', torch.__version__, '| lightning', lightning.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
    if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; fi
    uptime
} > "$OUT/environment.txt" 2>&1

timeout "$STEP_LIMIT" $PYTHON benchmarks/gpu_step.py "${STEP[@]}" --json "$OUT/gpu_step.json" 2>&1 | tee "$OUT/gpu_step.log"
$PYTHON benchmarks/memory_model.py --compare "$OUT/gpu_step.json" | tee "$OUT/memory_model.txt"

$PYTHON benchmarks/gpu_step.py --shape "$SHAPE" --write-model "$OUT/model"
timeout "$FIT_LIMIT" $PYTHON -m cepo fit --config configs/quickstart.yaml --config configs/experiments/gpu_1.5b_cepo.yaml \
    --model.init_args.policy.name_or_path "config:$OUT/model" \
    --trainer.logger.init_args.save_dir "$OUT/runs" \
    --trainer.callbacks+=fit_report.FitReport --trainer.callbacks.path "$OUT/fit.json" \
    "${FIT[@]}" 2>&1 | tee "$OUT/fit.log"

$PYTHON benchmarks/fit_report.py --summary "$OUT"
