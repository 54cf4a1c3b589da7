#!/usr/bin/env bash
# N JAX processes on this machine, each with M CPU devices, joined through jax.distributed on
# 127.0.0.1: the multi-host code path (one process per host, a coordinator, cross-process
# collectives over gloo) exercised without a second host. Tests and developers use it; real
# clusters use tpu_vm.sh, slurm.sbatch or multihost.sh, which set the same variables.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/local_multiprocess.sh [OPTIONS] [-- TRAINER FLAGS... | --cmd COMMAND ARGS...]

Run N JAX processes on 127.0.0.1, each seeing M CPU devices, as one multi-controller job
(N x M devices in all). Every process gets
  JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT  JAX_NUM_PROCESSES=N  JAX_PROCESS_ID=i
  JAX_PLATFORMS=cpu  XLA_FLAGS="$XLA_FLAGS --xla_force_host_platform_device_count=M"
which resnet_jax.parallel.initialize_distributed() reads. Output lines are prefixed with
"[i] ". When any process exits with an error the others get SIGTERM, then SIGKILL after
--grace seconds, and the launcher exits with the first failure's status (a job whose peer is
gone can only hang or fail in its next collective). Ctrl-C (or SIGTERM to the launcher) sends
SIGTERM to every process, so the trainer saves and stops at a common step; a second one SIGKILL.

By default the command is `PYTHON -m resnet_jax.train`, and the arguments after the options
are its flags:
  launch/local_multiprocess.sh -n 2 -d 2 -- --config configs/cifar10.py:resnet20 --workdir /tmp/w

Options:
  -n, --num-processes N        processes to start (default 2)
  -d, --devices-per-process M  CPU devices each process sees (default 2)
  -p, --port PORT              coordinator port on 127.0.0.1 (default: a free port the OS picks)
  -l, --log-dir DIR            also write process i's raw output to DIR/process_i.log and its
                               pid to DIR/process_i.pid (so a test can kill one process)
  -g, --grace SECONDS          time survivors get after SIGTERM before SIGKILL (default 10)
      --python PY              interpreter for the default command (default: $PYTHON, else
                               python3)
      --cmd                    everything after it is the command to run instead of the trainer,
                               e.g. --cmd python my_script.py --flag
  -h, --help                   show this help and exit

Exit status: 0 when every process succeeded, else the status of the first process that failed
(128+signal when it was killed), 2 for bad options.
EOF
}

# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need_bash_5_1

num_processes=2
devices=2
port=""
log_dir=""
grace=10
python="${PYTHON:-python3}"

while (($#)); do
  case "$1" in
    -n|--num-processes) (($# >= 2)) || die "$1 needs a value"; positive_int "$1" "$2"; num_processes="$2"; shift 2 ;;
    -d|--devices-per-process) (($# >= 2)) || die "$1 needs a value"; positive_int "$1" "$2"; devices="$2"; shift 2 ;;
    -p|--port) (($# >= 2)) || die "$1 needs a value"; positive_int "$1" "$2"; port="$2"; shift 2 ;;
    -l|--log-dir) (($# >= 2)) || die "$1 needs a value"; log_dir="$2"; shift 2 ;;
    -g|--grace) (($# >= 2)) || die "$1 needs a value"; positive_int "$1" "$2"; grace="$2"; shift 2 ;;
    --python) (($# >= 2)) || die "$1 needs a value"; python="$2"; shift 2 ;;
    --cmd|--) break ;;
    -h|--help) usage; exit 0 ;;
    -*) die "unknown option '$1' (see --help; trainer flags go after --)" ;;
    *) break ;;
  esac
done
trainer_or_command "$python" "$@"

if [[ -z "$port" ]]; then
  # Bind to port 0 and read back what the OS chose; free again by the time the coordinator binds.
  port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')" \
    || die "could not pick a free port with '$python'; pass --port"
fi
if [[ -n "$log_dir" ]]; then
  mkdir -p "$log_dir" || die "cannot create log directory '$log_dir'"
fi

export JAX_COORDINATOR_ADDRESS="127.0.0.1:${port}"
export JAX_NUM_PROCESSES="$num_processes"
export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices}"

PIDS=()
# shellcheck disable=SC2317  # called by supervise
stop_process() { kill "-$2" "${PIDS[$1]}"; }
for ((i = 0; i < num_processes; i++)); do
  log="/dev/null"
  [[ -n "$log_dir" ]] && log="${log_dir}/process_${i}.log"
  spawn "$i" "$log" env "JAX_PROCESS_ID=${i}" "${COMMAND[@]}"
  PIDS+=("$SPAWNED_PID")
  if [[ -n "$log_dir" ]]; then echo "$SPAWNED_PID" > "${log_dir}/process_${i}.pid"; fi
done
echo "local_multiprocess: ${num_processes} processes x ${devices} CPU devices," \
     "coordinator ${JAX_COORDINATOR_ADDRESS}, pids ${PIDS[*]}" >&2
status=0
supervise "$grace" || status=$?
exit "$status"
