#!/usr/bin/env bash
# One-GPU check (issue 13): sed_effnet_b0 training in bf16 through `accelerate launch`, its samples/s and
# the share of time spent waiting for data, then pseudo-labeling throughput. Everything lands in $OUT
# (or runs/gpu_check/), with summary.json last. Sized to finish in well under 10 minutes on one H100/H200.
#
#   bench/gpu_check.sh            # GPU: installs carried wheels + the project, then measures
#   bench/gpu_check.sh --cpu      # same steps on the CPU at tiny size (model=tiny, smoke data): tests use it
#   CPU=1 bench/gpu_check.sh      # same as --cpu
#
# The GPU machine has torch/torchaudio/timm/accelerate/onnx/onnxruntime/pandas/scipy/... but no internet.
# Fill the wheels folder (default bench/wheels, or $WHEELS) beforehand, on a machine with pip access:
#   bench/fetch_wheels.sh [DIR]   # pip download of hydra-core, omegaconf, antlr4, soundfile, cffi, soxr, audiomentations ...
# and carry it (device tool: carry=["bench/wheels"]; the folder is git-ignored by bench/wheels/.gitignore).
# The wheels go to $SITE (default /tmp/site) on PYTHONPATH; the project is used from src/ (no torch install).
#
# Knobs (env): STEPS (optimizer steps per epoch), EPOCHS, BATCH, WORKERS (train.num_workers of the first run,
# default = the config's 2), MORE_WORKERS (a second run with this many workers; 0 = skip), DEVICE_AUG (1 = a
# third run with WORKERS workers and data.augment_on=device: augmentation and MixUp on the GPU; 0 = skip),
# WORK (scratch folder), PYTHON, SKIP_INSTALL=1.
set -euo pipefail

CPU=${CPU:-0}
for arg in "$@"; do
  case "$arg" in
    --cpu) CPU=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-$ROOT/runs/gpu_check}
WORK=${WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
WHEELS=${WHEELS:-$ROOT/bench/wheels}
SITE=${SITE:-/tmp/site}
mkdir -p "$OUT_DIR" "$WORK"
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-30} PYTHONUNBUFFERED=1 BIRDROUNDS_HOME="$WORK" WANDB_MODE=disabled OMP_WAIT_POLICY=PASSIVE
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"

say() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
step() { say "\$ $*"; "$@" 2>&1 | tee -a "$LOG"; }   # run, keep the output in the log; pipefail keeps the status

if [[ "$CPU" == 1 ]]; then
  MODE=cpu
  export ACCELERATE_USE_CPU=1 CUDA_VISIBLE_DEVICES=""
  ACC_CONFIG=configs/accelerate/cpu_2proc.yaml   # MULTI_GPU launcher + use_cpu; --num_processes 1 below
  STEPS=${STEPS:-3}; EPOCHS=${EPOCHS:-2}; BATCH=${BATCH:-8}; MORE_WORKERS=${MORE_WORKERS:-0}; WORKERS=${WORKERS:-1}
  TRAIN_ARGS=(experiment=smoke)   # model=tiny, data=synthetic_smoke, train=smoke
else
  MODE=gpu
  ACC_CONFIG=configs/accelerate/multi_gpu.yaml
  # 3 epochs x 40 steps x 64 clips; each epoch restarts the workers and validates, the first also warms up.
  STEPS=${STEPS:-40}; EPOCHS=${EPOCHS:-3}; BATCH=${BATCH:-64}; MORE_WORKERS=${MORE_WORKERS:-12}
  TRAIN_ARGS=(model=sed_effnet_b0 train=default data=synthetic data.num_workers=8)   # 8 synth/cache processes
fi
SKIP_INSTALL=${SKIP_INSTALL:-$([[ "$MODE" == cpu ]] && echo 1 || echo 0)}
say "mode=$MODE root=$ROOT work=$WORK out=$OUT_DIR steps=$STEPS epochs=$EPOCHS batch=$BATCH"

# 1. Install: carried wheels into $SITE (no index, no deps: the image supplies torch & co), project from src/.
if [[ "$SKIP_INSTALL" != 1 ]]; then
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    step "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH="$PYTHONPATH:$SITE"
  else
    say "no wheels in $WHEELS: assuming hydra-core, soundfile, soxr, audiomentations ... are installed"
  fi
fi
{
  echo "python: $("$PY" -c 'import sys; print(sys.version.split()[0])')"
  "$PY" -c 'import torch, torchaudio, timm, accelerate, hydra, soundfile, audiomentations; print("torch", torch.__version__, "torchaudio", torchaudio.__version__, "timm", timm.__version__, "accelerate", accelerate.__version__, "hydra", hydra.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")'
  echo "cpus: $(nproc)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
} 2>&1 | tee -a "$LOG" >"$OUT_DIR/env.txt"
if [[ "$MODE" == gpu ]] && ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  say "no CUDA device visible: use --cpu"; exit 1
fi

# 2. Synthetic data (and the decoded-audio cache, filled by the first training run).
t0=$(date +%s)
step "$PY" -m birdrounds.cli synth "${TRAIN_ARGS[@]}" logger=none
SYNTH_S=$(( $(date +%s) - t0 ))

# 3. Training through accelerate launch, bf16, one process; fit() records samples/s and data_wait_share
#    per epoch in round_0/metrics.json (time blocked in next(loader) / epoch time, main process).
train() {  # train NAME WORKERS [OVERRIDES...]
  local name=$1 workers=$2
  shift 2
  step "$PY" -m accelerate.commands.launch --config_file "$ACC_CONFIG" --num_processes 1 \
    rounds/run.py "${TRAIN_ARGS[@]}" "$@" round=0 logger=none experiment_name="$name" \
    train.mixed_precision=bf16 train.epochs="$EPOCHS" train.max_steps_per_epoch="$STEPS" \
    train.batch_size="$BATCH" train.num_workers="$workers" train.log_every_steps=10 \
    data.sampler.samples_per_epoch=$(( STEPS * BATCH ))
  cp "$WORK/runs/$name/round_0/metrics.json" "$OUT_DIR/metrics_$name.json"
}
WORKERS=${WORKERS:-$("$PY" -c 'from birdrounds.config import compose; print(compose(["train=default"]).train.num_workers)')}
t0=$(date +%s); train "w$WORKERS" "$WORKERS"; TRAIN_S=$(( $(date +%s) - t0 ))
RUNS=("w$WORKERS")
if [[ "$MORE_WORKERS" != 0 && "$MORE_WORKERS" != "$WORKERS" ]]; then
  train "w$MORE_WORKERS" "$MORE_WORKERS"; RUNS+=("w$MORE_WORKERS")
fi
if [[ "${DEVICE_AUG:-1}" == 1 ]]; then
  train "w${WORKERS}_device" "$WORKERS" data.augment_on=device; RUNS+=("w${WORKERS}_device")
fi

# 4. Pseudo-labeling throughput with the trained teacher (predict_windows, as a student round calls it).
step "$PY" bench/pseudo_rate.py "$WORK/runs/w$WORKERS/round_0/model.pt" --json "$OUT_DIR/pseudo.json" \
  "${TRAIN_ARGS[@]}" train.batch_size="$BATCH"

# 5. Summary: per run, the last epoch (the first pays worker start-up and cuDNN warm-up) and all epochs.
"$PY" - "$OUT_DIR" "$MODE" "$SYNTH_S" "$TRAIN_S" "${RUNS[@]}" <<'EOF' | tee -a "$LOG"
import json, sys
from pathlib import Path
out, mode, synth_s, train_s, runs = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:]
env = (out / "env.txt").read_text()
summary = {"mode": mode, "env": env.strip().splitlines(), "synth_s": synth_s, "first_train_run_s": train_s,
           "training": {}, "pseudo": json.loads((out / "pseudo.json").read_text()), "data_wait_limit": 0.10}
for name in runs:
    history = json.loads((out / f"metrics_{name}.json").read_text())["history"]
    last = history[-1]
    summary["training"][name] = {
        "num_workers": int(name[1:].split("_")[0]),
        "augment_on": "device" if name.endswith("_device") else "workers",
        "samples_per_s": round(last["samples_per_s"], 2), "data_wait_share": round(last["data_wait_share"], 4),
        "epochs": [{"epoch": h["epoch"], "samples_per_s": round(h["samples_per_s"], 2),
                    "data_wait_share": round(h["data_wait_share"], 4)} for h in history],
    }
first = summary["training"][runs[0]]
summary["samples_per_s"], summary["data_wait_share"] = first["samples_per_s"], first["data_wait_share"]
summary["pseudo_windows_per_s"] = summary["pseudo"]["windows_per_s"]
summary["verdict"] = "OK" if first["data_wait_share"] < 0.10 else "DATA-BOUND"
(out / "summary.json").write_text(json.dumps(summary, indent=2))
for name, t in summary["training"].items():
    print(f"train {name}: {t['samples_per_s']} samples/s, data wait {100 * t['data_wait_share']:.1f}% (last epoch)")
print(f"pseudo-labeling: {summary['pseudo_windows_per_s']} windows/s "
      f"({summary['pseudo']['soundscape_s_per_s']} s of soundscape/s) on {summary['pseudo']['device']}")
print(f"verdict ({runs[0]}): {summary['verdict']}; summary: {out / 'summary.json'}")
EOF
