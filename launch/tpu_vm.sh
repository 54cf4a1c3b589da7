#!/usr/bin/env bash
# Train on a Cloud TPU VM, single host or pod slice, with nothing but gcloud. Every host of a
# slice runs the same `python -m resnet_jax.train`; jax.distributed finds the other hosts through
# the TPU metadata server, so no coordinator address is passed. Checkpoints and metrics go to a
# gs:// workdir that every host reaches and that outlives the VM: after a preemption the same
# command on a new VM resumes from the latest complete checkpoint.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh [OPTIONS] COMMAND [-- TRAINER FLAGS...]

Commands:
  create    create the TPU VM (`gcloud compute tpus tpu-vm create`)
  install   copy this checkout (its committed files, via `git archive HEAD`) to every worker and
            install it there with its tpu extra (jax[tpu] with the matching libtpu, train and
            gcs: gcsfs) in ~/.venv-resnet-jax, a Python 3.11 that uv fetches (the images' python3
            is 3.10, older than jax supports)
  train     start `~/.venv-resnet-jax/bin/python -m resnet_jax.train --config CONFIG --workdir
            WORKDIR [TRAINER FLAGS]` on every worker in the background (log in ~/train.log,
            pid in ~/train.pid); refuses to start a second trainer beside a running one
  logs      stream a worker's ~/train.log (worker 0 by default: only process 0 logs)
  status    print the VM's state (READY, CREATING, PREEMPTED, ...)
  stop      send SIGTERM to the trainer on every worker (it saves a checkpoint and exits)
  resume    after a preemption: if the VM is PREEMPTED or TERMINATED, delete and re-create it
            and install again; then `train` with the same WORKDIR, where the trainer picks up its
            latest complete checkpoint. A READY VM just gets `train` again. Give it the same
            --name, --zone, --accelerator-type, --spot/--preemptible, --config and --workdir
            as the first run.
  delete    delete the TPU VM
  up        create + install + train + logs

Options:
  -n, --name NAME          TPU VM name (default: $TPU_NAME, else resnet-jax)
  -z, --zone ZONE          zone, e.g. us-central2-b for v4, us-west4-a for v5e (default: $TPU_ZONE,
                           else gcloud's compute/zone)
  -p, --project PROJECT    Google Cloud project (default: $TPU_PROJECT, else gcloud's project)
  -t, --accelerator-type T slice type: v4-8 (one host, 4 chips), v4-32 (4 hosts),
                           v5litepod-8 (one host, 8 chips), v5litepod-32 (4 hosts), v5p-8,
                           v6e-8, ... (default: v4-8). Hosts = ceil(N / 8) for all of these.
  -v, --version RUNTIME    TPU software version (default from the type: v4 ->
                           tpu-ubuntu2204-base, v5litepod -> v2-alpha-tpuv5-lite, v5p ->
                           v2-alpha-tpuv5, v6e -> v2-alpha-tpuv6e)
      --spot               create a Spot VM (cheapest; may be preempted at any time)
      --preemptible        create a legacy preemptible VM (preempted at least every 24 h)
  -c, --config CONFIG      training config (default: configs/cifar10.py:resnet56)
  -w, --workdir DIR        where checkpoints and metrics go; must be gs://BUCKET/PATH on a pod
                           slice (hosts do not share disks) and should be on any VM you may lose
  -W, --worker W           worker for `logs` (default 0)
  -s, --source DIR         checkout to install (default: the repository holding this script)
      --dry-run            print the gcloud commands instead of running them (needs no gcloud)
  -h, --help               show this help and exit

Example, a Spot v4-32 slice (4 hosts, 16 chips) training ResNet-110 on CIFAR-10:
  launch/tpu_vm.sh -z us-central2-b -t v4-32 --spot -c configs/cifar10.py:resnet110 \
      -w gs://my-bucket/resnet110 up
  launch/tpu_vm.sh -z us-central2-b resume -c configs/cifar10.py:resnet110 -w gs://my-bucket/resnet110
  launch/tpu_vm.sh -z us-central2-b delete
EOF
}

# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

name="${TPU_NAME:-resnet-jax}"
zone="${TPU_ZONE:-}"
project="${TPU_PROJECT:-}"
accelerator="v4-8"
version=""
provisioning=""
config="configs/cifar10.py:resnet56"
workdir=""
worker=0
source_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dry_run=0
command=""
# jax 0.7 and later need Python 3.11 or newer; the venv every worker trains in.
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
# shellcheck disable=SC2088  # the tilde expands on the workers, in their home
VENV="~/.venv-resnet-jax"
trainer_flags=()

while (($#)); do
  case "$1" in
    -n|--name) (($# >= 2)) || die "$1 needs a value"; name="$2"; shift 2 ;;
    -z|--zone) (($# >= 2)) || die "$1 needs a value"; zone="$2"; shift 2 ;;
    -p|--project) (($# >= 2)) || die "$1 needs a value"; project="$2"; shift 2 ;;
    -t|--accelerator-type) (($# >= 2)) || die "$1 needs a value"; accelerator="$2"; shift 2 ;;
    -v|--version) (($# >= 2)) || die "$1 needs a value"; version="$2"; shift 2 ;;
    --spot) provisioning="--spot"; shift ;;
    --preemptible) provisioning="--preemptible"; shift ;;
    -c|--config) (($# >= 2)) || die "$1 needs a value"; config="$2"; shift 2 ;;
    -w|--workdir) (($# >= 2)) || die "$1 needs a value"; workdir="$2"; shift 2 ;;
    -W|--worker) (($# >= 2)) || die "$1 needs a value"; worker="$2"; shift 2 ;;
    -s|--source) (($# >= 2)) || die "$1 needs a value"; source_dir="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; trainer_flags=("$@"); break ;;
    -*) die "unknown option '$1' (see --help; trainer flags go after --)" ;;
    create|install|train|logs|status|stop|resume|delete|up)
      [[ -z "$command" ]] || die "one command at a time ('$command' and '$1' given)"
      command="$1"; shift ;;
    *) die "unknown command '$1'; one of: create install train logs status stop resume delete up" ;;
  esac
done
[[ -n "$command" ]] || die "no command given; one of: create install train logs status stop resume delete up (see --help)"

[[ "$accelerator" =~ ^(v[0-9]+[a-z]*)-([0-9]+)$ ]] \
  || die "accelerator type '$accelerator' is not of the form GENERATION-SIZE, e.g. v4-32 or v5litepod-8"
generation="${BASH_REMATCH[1]}"
size="${BASH_REMATCH[2]}"
hosts=$(((size + 7) / 8))
if [[ -z "$version" ]]; then
  case "$generation" in
    v2|v3|v4) version="tpu-ubuntu2204-base" ;;
    v5litepod|v5e) version="v2-alpha-tpuv5-lite" ;;
    v5p) version="v2-alpha-tpuv5" ;;
    v6e) version="v2-alpha-tpuv6e" ;;
    *) die "no default software version for '$generation'; pass --version" ;;
  esac
fi
[[ "$worker" =~ ^[0-9]+$ ]] || die "--worker must be a worker number, not '$worker'"

# Flags every gcloud call shares. An empty zone/project means gcloud's own configured default.
common=()
[[ -n "$zone" ]] && common+=("--zone=${zone}")
[[ -n "$project" ]] && common+=("--project=${project}")

# Print a command, then run it. With --dry-run the commands
# (and a comment line saying what each is for) go to stdout and nothing runs.
run() {
  local why="$1"; shift
  if ((dry_run)); then
    printf '# %s\n%s\n' "$why" "$(quote "$@")"
  else
    echo "+ $(quote "$@")" >&2
    "$@"
  fi
}
if ((!dry_run)); then
  command -v gcloud >/dev/null || die "gcloud is not installed; see https://cloud.google.com/sdk/docs/install (or use --dry-run)"
fi

need_workdir() {
  [[ -n "$workdir" ]] || die "--workdir is needed for '$command'; use gs://BUCKET/PATH so a new VM can resume from it"
  if ((hosts > 1)) && [[ "$workdir" != gs://* ]]; then
    die "a $accelerator slice has $hosts hosts that share no disk; --workdir must be gs://BUCKET/PATH, not '$workdir'"
  fi
}

do_create() {
  # One VM per host of the slice, all created together. --spot/--preemptible trade price for the
  # risk of preemption; a preempted VM stays in state PREEMPTED until deleted (see `resume`).
  local args=(gcloud compute tpus tpu-vm create "$name" "${common[@]}"
              "--accelerator-type=${accelerator}" "--version=${version}")
  [[ -n "$provisioning" ]] && args+=("$provisioning")
  run "create the TPU VM: ${accelerator}, ${hosts} host(s)${provisioning:+, ${provisioning#--}}" "${args[@]}"
}

do_install() {
  [[ -e "$source_dir/.git" ]] || die "'$source_dir' is not a git checkout; pass --source"
  local tarball="${TMPDIR:-/tmp}/resnet_jax-${name}.tar.gz"
  # Committed files only: what runs on the slice is a version someone can name.
  run "pack the committed files of the checkout (uncommitted changes are not shipped)" \
    git -C "$source_dir" archive --format=tar.gz -o "$tarball" HEAD
  # scp to every worker of the slice (--worker=all), not just worker 0.
  run "copy it to every worker" \
    gcloud compute tpus tpu-vm scp "$tarball" "${name}:resnet_jax.tar.gz" "${common[@]}" --worker=all
  # On every worker: unpack beside the configs; uv (pip-installed by the image's own Python,
  # from PyPI like every other package) fetches a standalone CPython of PYTHON_VERSION, the same
  # build on every image, with no apt repository or root needed; the package goes into its venv
  # with jax[tpu] and the storage packages.
  run "unpack it on every worker; a Python ${PYTHON_VERSION} venv with the package, jax[tpu] and gcsfs" \
    gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all --command \
    "set -e; rm -rf ~/resnet_jax; mkdir -p ~/resnet_jax; tar -xzf ~/resnet_jax.tar.gz -C ~/resnet_jax; python3 -m pip install -q --user -U uv; ~/.local/bin/uv venv -q --allow-existing --python ${PYTHON_VERSION} ${VENV}; ~/.local/bin/uv pip install -q --python ${VENV}/bin/python -e \"\$HOME/resnet_jax[tpu]\""
}

do_train() {
  need_workdir
  local flags
  flags="$(quote --config "$config" --workdir "$workdir" "${trainer_flags[@]+"${trainer_flags[@]}"}")"
  # Every worker runs the same command (--worker=all); each is one JAX process, and
  # jax.distributed.initialize() learns the slice's hosts from the TPU metadata. setsid+nohup
  # detach it from the ssh session, so closing the terminal does not stop training.
  run "start the trainer on every worker (a restart with the same workdir resumes)" \
    gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all --command \
    "if test -f ~/train.pid && kill -0 \$(cat ~/train.pid) 2>/dev/null; then echo \"a trainer is already running (see stop)\" >&2; exit 1; fi; cd ~/resnet_jax && setsid nohup ${VENV}/bin/python -m resnet_jax.train ${flags} > ~/train.log 2>&1 < /dev/null & echo \$! > ~/train.pid"
}

do_logs() {
  # Process 0 prints progress; the other workers' logs hold only their errors.
  run "stream worker ${worker}'s log (Ctrl-C stops the stream, not the training)" \
    gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" "--worker=${worker}" --command \
    'tail -n +1 -F ~/train.log'
}

do_status() {
  run "print the VM's state" \
    gcloud compute tpus tpu-vm describe "$name" "${common[@]}" '--format=value(state)'
}

do_stop() {
  # SIGTERM is what a preemption notice sends: the trainer saves a checkpoint and exits.
  # shellcheck disable=SC2016  # $(cat ...) must expand on the worker, not here
  run "send SIGTERM to the trainer on every worker (it checkpoints and exits)" \
    gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all --command \
    'if test -f ~/train.pid; then kill -TERM "$(cat ~/train.pid)"; fi'
}

do_delete() {
  # --quiet: no confirmation prompt. The gs:// workdir is untouched.
  run "delete the TPU VM (the gs:// workdir stays)" \
    gcloud compute tpus tpu-vm delete "$name" "${common[@]}" --quiet
}

do_resume() {
  need_workdir
  local state
  if ((dry_run)); then
    do_status
    echo "# if that state is PREEMPTED or TERMINATED (a Spot VM never restarts by itself):"
    state="PREEMPTED"
  else
    state="$(do_status 2>/dev/null || echo MISSING)"
    echo "tpu_vm: '${name}' is ${state}" >&2
  fi
  case "$state" in
    READY) ;;
    PREEMPTED|TERMINATED) do_delete; do_create; do_install ;;
    MISSING|"") do_create; do_install ;;
    *) die "TPU VM '$name' is $state; wait until it is READY or PREEMPTED and run resume again" ;;
  esac
  # Same --workdir: the trainer restores its latest complete checkpoint and data position.
  do_train
}

case "$command" in
  create) do_create ;;
  install) do_install ;;
  train) do_train ;;
  logs) do_logs ;;
  status) do_status ;;
  stop) do_stop ;;
  resume) do_resume ;;
  delete) do_delete ;;
  up) need_workdir; do_create; do_install; do_train; do_logs ;;
esac
