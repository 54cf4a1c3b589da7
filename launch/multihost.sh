#!/usr/bin/env bash
# One JAX process per host over plain ssh, for machines no scheduler manages (a few GPU boxes on
# one network). The first host is the coordinator; every process gets its address, the process
# count and its own index, which resnet_jax.parallel.initialize_distributed() reads.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/multihost.sh [OPTIONS] --hosts H1,H2,... [-- TRAINER FLAGS... | --cmd COMMAND...]

Start one process per host over ssh, all running the same command from the same checkout path:
  ssh HOST_i 'cd DIR && exec env JAX_COORDINATOR_ADDRESS=H1:PORT JAX_NUM_PROCESSES=N \
              JAX_PROCESS_ID=i [--env ...] PYTHON -m resnet_jax.train TRAINER FLAGS'
Each process uses every accelerator of its host. Output lines are prefixed with "[i] ". When one
process fails the others get SIGTERM over ssh (the trainer checkpoints), then SIGKILL after
--grace seconds. Ctrl-C (or SIGTERM to the launcher) sends SIGTERM to every process; a second
one SIGKILL. The --workdir you give the trainer must be on a file system every host mounts
at the same path (NFS, Lustre, gs://): the trainer checks this and stops if it is not.

Example, two 8-GPU hosts:
  launch/multihost.sh --hosts gpu1,gpu2 -- --config configs/cifar10.py:resnet110 \
      --workdir /shared/runs/resnet110

Options:
  -H, --hosts LIST        comma-separated ssh destinations ([user@]host); the first runs process 0
                          and the coordinator
  -f, --hostfile FILE     read the hosts from FILE, one per line (# starts a comment)
  -c, --coordinator ADDR  host name or IP the others reach process 0 at (default: the first host
                          without its user@)
  -p, --port PORT         coordinator port (default 12355); must be open between the hosts
  -r, --remote-dir DIR    the checkout on every host (default: this checkout's path here)
      --python PY         interpreter on the hosts (default python3)
  -e, --env NAME=VALUE    an extra environment variable for every process (repeatable), e.g.
                          -e NCCL_SOCKET_IFNAME=eth0 -e XLA_PYTHON_CLIENT_MEM_FRACTION=.9
      --ssh COMMAND       ssh program and its options, split on spaces (default:
                          "ssh -o BatchMode=yes"); the remote command is always its last argument
  -l, --log-dir DIR       also write process i's raw output to DIR/process_i.log here
  -g, --grace SECONDS     time survivors get after SIGTERM before SIGKILL (default 30)
      --dry-run           print the ssh commands instead of running them
      --cmd               everything after it is the command to run instead of the trainer
  -h, --help              show this help and exit

Exit status: 0 when every process succeeded, else the first failure's status; 2 for bad options.
EOF
}

# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

hosts=()
coordinator=""
port=12355
remote_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="python3"
extra_env=()
ssh_command="ssh -o BatchMode=yes"
log_dir=""
grace=30
dry_run=0

add_hosts() {
  local h
  for h in "$@"; do [[ -n "$h" ]] && hosts+=("$h"); done
  return 0
}

while (($#)); do
  case "$1" in
    -H|--hosts) (($# >= 2)) || die "$1 needs a value"; IFS=, read -ra list <<< "$2"; add_hosts "${list[@]}"; shift 2 ;;
    -f|--hostfile)
      (($# >= 2)) || die "$1 needs a value"
      [[ -r "$2" ]] || die "host file '$2' cannot be read"
      while read -r line; do line="${line%%#*}"; add_hosts "${line//[[:space:]]/}"; done < "$2"
      shift 2 ;;
    -c|--coordinator) (($# >= 2)) || die "$1 needs a value"; coordinator="$2"; shift 2 ;;
    -p|--port) (($# >= 2)) || die "$1 needs a value"; positive_int "$1" "$2"; port="$2"; shift 2 ;;
    -r|--remote-dir) (($# >= 2)) || die "$1 needs a value"; remote_dir="$2"; shift 2 ;;
    --python) (($# >= 2)) || die "$1 needs a value"; python="$2"; shift 2 ;;
    -e|--env)
      (($# >= 2)) || die "$1 needs a value"
      [[ "$2" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env takes NAME=VALUE, not '$2'"
      extra_env+=("$2"); shift 2 ;;
    --ssh) (($# >= 2)) || die "$1 needs a value"; ssh_command="$2"; shift 2 ;;
    -l|--log-dir) (($# >= 2)) || die "$1 needs a value"; log_dir="$2"; shift 2 ;;
    -g|--grace) (($# >= 2)) || die "$1 needs a value"; positive_int "$1" "$2"; grace="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --cmd|--) break ;;
    -h|--help) usage; exit 0 ;;
    -*) die "unknown option '$1' (see --help; trainer flags go after --)" ;;
    *) break ;;
  esac
done
trainer_or_command "$python" "$@"
((${#hosts[@]})) || die "no hosts; pass --hosts H1,H2,... or --hostfile FILE"
[[ -n "$coordinator" ]] || coordinator="${hosts[0]#*@}"
read -ra ssh_argv <<< "$ssh_command"
((${#ssh_argv[@]})) || die "--ssh is empty"
if [[ -n "$log_dir" ]]; then mkdir -p "$log_dir" || die "cannot create log directory '$log_dir'"; fi

n=${#hosts[@]}
job="resnet_jax-${port}"
pidfile() { echo "/tmp/${job}-process_$1.pid"; }

# The remote shell: record its pid (so a stop can reach it over ssh), then exec the command in
# its place with the coordinator variables set.
remote_command() {
  local i="$1"
  echo "cd $(quote "$remote_dir") && echo \$\$ > $(pidfile "$i") && exec env" \
       "$(quote "JAX_COORDINATOR_ADDRESS=${coordinator}:${port}" "JAX_NUM_PROCESSES=${n}" \
                "JAX_PROCESS_ID=${i}" "${extra_env[@]+"${extra_env[@]}"}" "${COMMAND[@]}")"
}

if ((dry_run)); then
  for ((i = 0; i < n; i++)); do
    echo "# process ${i} of ${n} on ${hosts[i]}"
    quote "${ssh_argv[@]}" "${hosts[i]}" "$(remote_command "$i")"
  done
  exit 0
fi
need_bash_5_1

PIDS=()
# shellcheck disable=SC2317  # called by supervise
stop_process() {
  "${ssh_argv[@]}" "${hosts[$1]}" "kill -$2 \$(cat $(pidfile "$1")) 2>/dev/null; rm -f $(pidfile "$1")" </dev/null
}
for ((i = 0; i < n; i++)); do
  log="/dev/null"
  [[ -n "$log_dir" ]] && log="${log_dir}/process_${i}.log"
  # </dev/null: ssh must not read the launcher's stdin (it would steal it from the others).
  spawn "$i" "$log" "${ssh_argv[@]}" "${hosts[i]}" "$(remote_command "$i")" </dev/null
  PIDS+=("$SPAWNED_PID")
done
echo "multihost: ${n} processes on ${hosts[*]}, coordinator ${coordinator}:${port}" >&2
status=0
supervise "$grace" || status=$?
exit "$status"
