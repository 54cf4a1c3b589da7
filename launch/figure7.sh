#!/usr/bin/env bash
# The paper's Figure 7 from scratch: train plain-20, plain-56, ResNet-20, ResNet-56 and ResNet-110
# on CIFAR-10 with the recipe of Sec. 4.2 (configs/cifar10.py), then draw the std of every 3x3
# layer's response with resnet_jax.analyze. Each net trains with every device the trainer sees;
# the script can be stopped and rerun at any point: finished nets are skipped and an interrupted
# one resumes from its latest checkpoint.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/figure7.sh [OPTIONS] [-- TRAINER FLAGS...]

For each model: `PYTHON -m resnet_jax.train --config CONFIG:MODEL --workdir ROOT/MODEL TRAINER
FLAGS` (through --launcher if given), then
`PYTHON -m resnet_jax.analyze ROOT/plain20 ... ROOT/resnet110 --data DATA --split SPLIT --out OUT`,
which writes OUT/figure7.png, OUT/figure7.pdf, per-model CSV/JSON and a table.

A model is skipped when OUT/logs/MODEL.done exists (written when its training finished, not when
it was preempted); delete that file to run it again. Without the marker the trainer still knows:
a finished workdir is evaluated, not retrained, and a partial one resumes.

Options:
  -r, --root DIR         parent of the training workdirs, ROOT/MODEL (default: workdirs/figure7); a
                         gs://BUCKET/PATH on TPU VMs
  -o, --out DIR          local directory for the figure, tables, logs and done markers (default:
                         ROOT/figure7 when ROOT is local; needed when ROOT is gs://)
  -m, --models LIST      comma-separated models (default: plain20,plain56,resnet20,resnet56,resnet110)
  -c, --config FILE      config file whose get_config(MODEL) is the recipe (default:
                         configs/cifar10.py; configs/cpu.py is the same recipe cut to 1,000 steps)
  -d, --data SOURCE      images the analysis runs over: cifar10 (tfds, default), folder:PATH,
                         synthetic[:N]. Training data is the config's, or --config.data.source=...
                         among the trainer flags
  -s, --split SPLIT      split of --data for the analysis (default: test)
  -L, --launcher CMD     prefix that starts each training run across processes, split on spaces,
                         e.g. "launch/local_multiprocess.sh -n 2 -d 2 --cmd",
                         "launch/multihost.sh -H gpu1,gpu2 --cmd", or "srun" inside a SLURM
                         allocation with one task per GPU (for one task per node export
                         JAX_LOCAL_DEVICE_IDS=0,...,G-1 first, as slurm.sbatch does)
                         (default: none, one process with all its local devices)
      --python PY        interpreter (default: $PYTHON, else python3)
      --no-analysis      train only
      --analysis-only    analyse existing workdirs only
      --dry-run          print the commands instead of running them
  -h, --help             show this help and exit

On a TPU pod slice every host must run each training: run this script on all workers with
--no-analysis (e.g. tpu_vm.sh's gcloud ssh --worker=all), then once with --analysis-only
wherever the gs:// ROOT can be read.

Examples:
  launch/figure7.sh                                       # the paper's 64k-step runs, here
  launch/figure7.sh -c configs/cpu.py -d folder:../shared/data/cifar10-jpeg \
      -- --config.data.source=folder:../shared/data/cifar10-jpeg
EOF
}

# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

root="workdirs/figure7"
out=""
models="plain20,plain56,resnet20,resnet56,resnet110"
config="configs/cifar10.py"
data="cifar10"
split="test"
launcher=""
python="${PYTHON:-python3}"
train=1
analyze=1
dry_run=0
trainer_flags=()

while (($#)); do
  case "$1" in
    -r|--root) (($# >= 2)) || die "$1 needs a value"; root="${2%/}"; shift 2 ;;
    -o|--out) (($# >= 2)) || die "$1 needs a value"; out="$2"; shift 2 ;;
    -m|--models) (($# >= 2)) || die "$1 needs a value"; models="$2"; shift 2 ;;
    -c|--config) (($# >= 2)) || die "$1 needs a value"; config="$2"; shift 2 ;;
    -d|--data) (($# >= 2)) || die "$1 needs a value"; data="$2"; shift 2 ;;
    -s|--split) (($# >= 2)) || die "$1 needs a value"; split="$2"; shift 2 ;;
    -L|--launcher) (($# >= 2)) || die "$1 needs a value"; launcher="$2"; shift 2 ;;
    --python) (($# >= 2)) || die "$1 needs a value"; python="$2"; shift 2 ;;
    --no-analysis) analyze=0; shift ;;
    --analysis-only) train=0; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; trainer_flags=("$@"); break ;;
    *) die "unknown option '$1' (see --help; trainer flags go after --)" ;;
  esac
done
((train || analyze)) || die "--no-analysis and --analysis-only together leave nothing to do"
[[ -f "$config" ]] || die "config file '$config' not found; run from the repository root or pass --config"
if [[ -z "$out" ]]; then
  [[ "$root" != *://* ]] || die "--root $root is not local; pass --out for the figure and logs"
  out="$root/figure7"
fi
IFS=, read -ra model_list <<< "$models"
((${#model_list[@]})) || die "--models is empty"
read -ra launcher_argv <<< "$launcher"

# --dry-run: the commands on stdout, nothing run; otherwise each echoed to stderr, then run.
run() {
  if ((dry_run)); then quote "$@"; return; fi
  echo "+ $(quote "$@")" >&2
  "$@"
}

if ((train)); then
  ((dry_run)) || mkdir -p "$out/logs"
  for model in "${model_list[@]}"; do
    done_marker="$out/logs/${model}.done"
    if [[ -f "$done_marker" ]]; then
      echo "figure7: ${model} finished before ($done_marker); skipped" >&2
      continue
    fi
    cmd=("${launcher_argv[@]+"${launcher_argv[@]}"}" "$python" -m resnet_jax.train
         --config "${config}:${model}" --workdir "${root}/${model}"
         "${trainer_flags[@]+"${trainer_flags[@]}"}")
    if ((dry_run)); then run "${cmd[@]}"; continue; fi
    echo "figure7: training ${model} (log: $out/logs/${model}.log)" >&2
    status=0
    run "${cmd[@]}" 2>&1 | tee -a "$out/logs/${model}.log" || status=$?
    ((status == 0)) || die "training ${model} failed (status ${status}); see $out/logs/${model}.log, fix, and rerun this script to resume"
    # The trainer exits 0 on SIGTERM too, after saving; its last line then says "preempted".
    if tail -n 5 "$out/logs/${model}.log" | grep -q '"preempted": true'; then
      echo "figure7: ${model} was preempted and saved; rerun this script to resume" >&2
      exit 1
    fi
    date -u +%FT%TZ > "$done_marker"
  done
fi

if ((analyze)); then
  runs=()
  for model in "${model_list[@]}"; do runs+=("${root}/${model}"); done
  run "$python" -m resnet_jax.analyze "${runs[@]}" --data "$data" --split "$split" --out "$out"
fi
