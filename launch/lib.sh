# shellcheck shell=bash
# What the launchers share: option checks, shell quoting, and (for local_multiprocess.sh and
# multihost.sh, which start one JAX process per host themselves) the supervision loop.
# Sourced, never run.

die() { echo "error: $*" >&2; exit 2; }

positive_int() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, not '$2'"; }

# "$@" as one line a shell reads back as the same words (for printing and for ssh, whose remote
# side joins its arguments and hands them to a shell).
quote() {
  local arg words=()
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then words+=("$arg"); else words+=("'${arg//\'/\'\\\'\'}'"); fi
  done
  echo "${words[*]}"
}

# What a process launcher runs, from the arguments left after its own options: `--cmd COMMAND...`
# runs COMMAND; anything else (after an optional `--`) are flags for `PYTHON -m resnet_jax.train`.
# Sets the global array COMMAND.
# shellcheck disable=SC2034  # COMMAND is read by the caller
trainer_or_command() {
  local python="$1"; shift
  if [[ "${1:-}" == "--cmd" ]]; then
    shift
    (($#)) || die "--cmd needs a command"
    COMMAND=("$@")
    return
  fi
  [[ "${1:-}" == "--" ]] && shift
  COMMAND=("$python" -m resnet_jax.train "$@")
}

need_bash_5_1() {
  if ((BASH_VERSINFO[0] < 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] < 1))); then
    die "bash >= 5.1 is needed (for 'wait -n -p'); this is ${BASH_VERSION}"
  fi
}

# Run "$@" in the background with its output prefixed by "[label] " (and copied raw to `log`,
# /dev/null for none); the pid of the command itself (not of a wrapper) lands in SPAWNED_PID.
spawn() {
  local label="$1" log="$2"; shift 2
  (exec "$@") > >(tee "$log" | sed -u "s/^/[${label}] /") 2>&1 &
  # shellcheck disable=SC2034  # read by the caller
  SPAWNED_PID=$!
}

# Wait for the processes in PIDS (a global array). The first one to fail stops the rest: a JAX
# job whose peer is gone can only hang or fail at its next collective. The caller defines
# `stop_process INDEX SIGNAL` (what stopping the INDEX-th process means: a local kill, or a kill
# over ssh). Survivors get SIGTERM (the trainer checkpoints on it), then SIGKILL after `grace`
# seconds. A first SIGINT/SIGTERM to the launcher reaches every process as SIGTERM (they save and
# stop together); a second one as SIGKILL.
# Returns 0 when all succeeded, else the first failure's status.
supervise() {
  local grace="$1" status=0 code finished i killer="" signalled=0 n=${#PIDS[@]}
  local -A index=()
  for ((i = 0; i < n; i++)); do index[${PIDS[i]}]=$i; done
  local running=("${PIDS[@]}")
  stop_running() {
    local pid
    for pid in "${running[@]+"${running[@]}"}"; do stop_process "${index[$pid]}" "$1" 2>/dev/null || true; done
  }
  # shellcheck disable=SC2317  # run by the trap
  on_signal() {
    if ((signalled++)); then stop_running KILL; else stop_running TERM; fi
  }
  trap on_signal INT TERM
  while ((${#running[@]})); do
    finished=""
    code=0
    wait -n -p finished "${running[@]}" || code=$?
    [[ -n "${finished:-}" ]] || continue  # a trapped signal interrupted wait (and unset it)
    local remaining=() pid
    for pid in "${running[@]}"; do [[ "$pid" == "$finished" ]] || remaining+=("$pid"); done
    running=("${remaining[@]+"${remaining[@]}"}")
    if ((code != 0 && status == 0)); then
      status=$code
      echo "launch: process ${index[$finished]} (pid ${finished}) exited with status ${code};" \
           "stopping the others" >&2
      stop_running TERM
      ( sleep "$grace"; stop_running KILL ) &
      killer=$!
    fi
  done
  trap - INT TERM
  if [[ -n "$killer" ]]; then kill "$killer" 2>/dev/null || true; fi
  wait  # let the output filters drain
  return "$status"
}
