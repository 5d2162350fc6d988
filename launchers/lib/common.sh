# shellcheck shell=bash
# Shared body of the bash launchers (launchers/run-*.sh): read an MPI hostfile, start a Ray cluster over a
# remote shell (head on the first host, `ray start --address` on the others, all at once), wait until every
# node has joined, then `ray job submit` one `glm-rl train` run with the recipe's flags.
#
# A recipe script sets RECIPE_NAME, RECIPE_GPUS (0: a CPU recipe, slots are logical CPUs) and the array
# RECIPE_ARGS, optionally RECIPE_HF_CHECKPOINT / RECIPE_PROMPT_DATA (defaults) and RECIPE_NEEDS_REF_LOAD=0,
# then calls `glm_main "$@"`.
# Every input is checked before the first remote command, so a typo costs seconds, not a cluster start.
# Paths (checkpoints, prompt data, this repository) must be valid on the head node: they are checked here,
# on the launcher's host, which is expected to share the filesystem (as on the clusters the recipes target).

GLM_LIB_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
GLM_REPO_DIR="$(cd "$GLM_LIB_DIR/../.." && pwd)"

glm_die() { echo "error: $*" >&2; exit 2; }
glm_log() { echo "[launcher $(date +%H:%M:%S)] $*" >&2; }

glm_usage() {
  local size="$RECIPE_GPUS GPUs"; ((RECIPE_GPUS)) || size="CPU only"
  cat <<EOF
usage: $(basename "$0") [options] [-- extra glm-rl train flags]

Starts a Ray cluster on the hosts of an MPI hostfile and submits the ${RECIPE_NAME} recipe (${size}).
Flags after -- are appended to \`glm-rl train\` (later flags win), e.g. to shorten a run.

inputs (flag, or the environment variable in brackets):
  --hostfile FILE       [GLM_RL_HOSTFILE]       lines "HOST slots=N" (N GPUs); # comments and blank lines ok
  --hf-checkpoint DIR   [GLM_RL_HF_CHECKPOINT]  HF checkpoint (engines load it; config checked against preset)
  --ref-load DIR        [GLM_RL_REF_LOAD]       torch_dist checkpoint of the reference model
  --load DIR            [GLM_RL_LOAD]           resume from here (default: --ref-load)
  --save DIR            [GLM_RL_SAVE]           checkpoints (default: <output-dir>/checkpoints)
  --prompt-data FILE    [GLM_RL_PROMPT_DATA]    JSONL with "prompt" and "label"
  --rm-type NAME        [GLM_RL_RM_TYPE]        reward (default: arithmetic)
  --output-dir DIR      [GLM_RL_OUTPUT_DIR]     default: outputs/${RECIPE_NAME}
cluster:
  --rsh CMD             [GLM_RL_RSH]            remote shell: CMD -- HOST 'command' (default: ssh -o BatchMode=yes)
  --remote-setup CMD    [GLM_RL_REMOTE_SETUP]   shell run on each host first (e.g. activate a venv)
  --ray-port N          [GLM_RL_RAY_PORT]       head GCS port (default 6379)
  --dashboard-port N    [GLM_RL_DASHBOARD_PORT] job-submission port (default 8265)
  --dashboard-host ADDR [GLM_RL_DASHBOARD_HOST] dashboard bind address (default 0.0.0.0)
  --ray-temp-dir DIR    [GLM_RL_RAY_TEMP_DIR]   node i keeps its Ray files in DIR/node<i> (default /tmp/glm_rl_ray)
  --node-port-base N    [GLM_RL_NODE_PORT_BASE] fixed ports N+100*i.. for node i (several nodes on one machine)
  --join-timeout S      [GLM_RL_JOIN_TIMEOUT]   seconds to wait for every node to join (default 300)
  --cpu                                         CPU smoke test: slots are logical CPUs, no GPUs, no GPU check
  --no-gpu-check                                allow hostfile slots != ${RECIPE_GPUS} (override the layout after --)
  --stop                                        stop the Ray nodes of the hostfile (only those under --ray-temp-dir)
  --stop-on-exit                                stop them when the launcher exits (done, failed or interrupted)
  --dry-run                                     print the commands instead of running them
environment: RAY_AUTH_MODE (default token: the token here — RAY_AUTH_TOKEN, or the file at RAY_AUTH_TOKEN_PATH or
  ~/.ray/auth_token — goes to every host's ray start on stdin), GLM_RL_RAY_START_ARGS (extra words for every
  ray start), NCCL_* GLOO_* TORCH_NCCL_* UCX_* MC_* RAY_DEDUP_LOGS (passed to the job).
EOF
}

# -- hostfile ------------------------------------------------------------------------------------------------
# A host is a name or an IP address: letters, digits, '.', '-', ':' and '_', never a leading '-' (ssh would read
# it as an option) nor anything a shell would interpret. glm_rl/launch.py applies the same rule.
GLM_HOST_RE='^[A-Za-z0-9_:][A-Za-z0-9_.:-]{0,252}$'

# Fills GLM_HOSTS and GLM_SLOTS. "HOST slots=N [max_slots=M]" per line; anything else names its line number.
glm_read_hostfile() {
  local file="$1" lineno=0 line host field n
  [[ -f "$file" ]] || glm_die "hostfile $file: no such file"
  GLM_HOSTS=(); GLM_SLOTS=()
  while IFS= read -r line || [[ -n "$line" ]]; do
    lineno=$((lineno + 1))
    line="${line%%#*}"
    read -r -a fields <<<"$line"
    ((${#fields[@]})) || continue
    host="${fields[0]}"; n=""
    # "slots=8" alone is a missing host; "-o...=..." is a hostile one (next check)
    [[ "$host" == -* || "$host" != *=* ]] || glm_die "hostfile $file:$lineno: expected 'HOST slots=N', got '$line'"
    [[ "$host" =~ $GLM_HOST_RE ]] || glm_die "hostfile $file:$lineno: '$host' is not a host name or IP address" \
      "(letters, digits, '.', '-', ':', '_'; not starting with '-')"
    for field in "${fields[@]:1}"; do
      case "$field" in
        slots=*) n="${field#slots=}" ;;
        max_slots=*) ;;
        *) glm_die "hostfile $file:$lineno: unknown field '$field' (expected 'HOST slots=N')" ;;
      esac
    done
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || glm_die "hostfile $file:$lineno: expected 'HOST slots=N' with N >= 1, got '$line'"
    for field in "${GLM_HOSTS[@]}"; do
      [[ "$field" != "$host" ]] || glm_die "hostfile $file:$lineno: host $host is listed twice"
    done
    GLM_HOSTS+=("$host"); GLM_SLOTS+=("$n")
  done <"$file"
  ((${#GLM_HOSTS[@]})) || glm_die "hostfile $file: no hosts (only comments or blank lines)"
}

# -- arguments -------------------------------------------------------------------------------------------------
glm_parse_args() {
  HOSTFILE="${GLM_RL_HOSTFILE:-}"; HF_CHECKPOINT="${GLM_RL_HF_CHECKPOINT:-${RECIPE_HF_CHECKPOINT:-}}"
  REF_LOAD="${GLM_RL_REF_LOAD:-}"; LOAD="${GLM_RL_LOAD:-}"; SAVE="${GLM_RL_SAVE:-}"
  PROMPT_DATA="${GLM_RL_PROMPT_DATA:-${RECIPE_PROMPT_DATA:-}}"
  RM_TYPE="${GLM_RL_RM_TYPE:-arithmetic}"; OUTPUT_DIR="${GLM_RL_OUTPUT_DIR:-outputs/$RECIPE_NAME}"
  RSH_CMD="${GLM_RL_RSH:-ssh -o BatchMode=yes}"; REMOTE_SETUP="${GLM_RL_REMOTE_SETUP:-}"
  RAY_PORT="${GLM_RL_RAY_PORT:-6379}"; DASHBOARD_PORT="${GLM_RL_DASHBOARD_PORT:-8265}"
  DASHBOARD_HOST="${GLM_RL_DASHBOARD_HOST:-0.0.0.0}"; RAY_TEMP_DIR="${GLM_RL_RAY_TEMP_DIR:-/tmp/glm_rl_ray}"
  NODE_PORT_BASE="${GLM_RL_NODE_PORT_BASE:-}"; JOIN_TIMEOUT="${GLM_RL_JOIN_TIMEOUT:-300}"
  CPU_MODE=$((RECIPE_GPUS == 0)); GPU_CHECK=$((RECIPE_GPUS > 0)); STOP_ONLY=0; STOP_ON_EXIT=0; DRY_RUN=0; EXTRA_ARGS=()
  while (($#)); do
    case "$1" in
      -h|--help) glm_usage; exit 0 ;;
      --hostfile|--hf-checkpoint|--ref-load|--load|--save|--prompt-data|--rm-type|--output-dir|--rsh|\
      --remote-setup|--ray-port|--dashboard-port|--dashboard-host|--ray-temp-dir|--node-port-base|--join-timeout)
        (($# >= 2)) || glm_die "$1 needs a value"
        local var="${1#--}"; var="${var//-/_}"; var="${var^^}"
        [[ "$var" == RSH ]] && var=RSH_CMD
        printf -v "$var" '%s' "$2"; shift 2 ;;
      --cpu) CPU_MODE=1; GPU_CHECK=0; shift ;;
      --no-gpu-check) GPU_CHECK=0; shift ;;
      --stop) STOP_ONLY=1; shift ;;
      --stop-on-exit) STOP_ON_EXIT=1; shift ;;
      --dry-run) DRY_RUN=1; shift ;;
      --) shift; EXTRA_ARGS=("$@"); break ;;
      *) glm_die "unknown option '$1' (see --help; glm-rl train flags go after --)" ;;
    esac
  done
  LOAD="${LOAD:-$REF_LOAD}"
  read -r -a RSH <<<"$RSH_CMD"
  read -r -a RAY_START_EXTRA <<<"${GLM_RL_RAY_START_ARGS:-}"
}

# Everything a run needs, checked before anything starts; --stop needs only the hostfile and the remote shell.
glm_check_inputs() {
  local name value
  [[ -n "$HOSTFILE" ]] || glm_die "no hostfile: pass --hostfile FILE or set GLM_RL_HOSTFILE"
  export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
  glm_read_hostfile "$HOSTFILE"
  ((${#RSH[@]})) || glm_die "--rsh is empty"
  command -v "${RSH[0]}" >/dev/null || glm_die "remote shell '${RSH[0]}' (--rsh / GLM_RL_RSH) not found on PATH"
  for name in RAY_PORT DASHBOARD_PORT JOIN_TIMEOUT ${NODE_PORT_BASE:+NODE_PORT_BASE}; do
    [[ "${!name}" =~ ^[0-9]+$ ]] || glm_die "${name,,} must be a number (got '${!name}')"
  done
  ((STOP_ONLY)) && return 0
  command -v ray >/dev/null || glm_die "ray not found on PATH: activate the environment with ray[default] installed"
  for name in HF_CHECKPOINT REF_LOAD LOAD; do
    value="${!name}"; local flag="--${name,,}"; flag="${flag//_/-}"
    [[ -n "$value" || ($name != HF_CHECKPOINT && ${RECIPE_NEEDS_REF_LOAD:-1} == 0) ]] ||
      glm_die "$flag is required (or set GLM_RL_$name)"
    [[ -z "$value" || -d "$value" ]] || glm_die "$flag $value: no such directory"
  done
  [[ -f "$HF_CHECKPOINT/config.json" ]] ||
    glm_die "--hf-checkpoint $HF_CHECKPOINT: no config.json (not an HF checkpoint)"
  [[ -n "$PROMPT_DATA" ]] || glm_die "--prompt-data is required (or set GLM_RL_PROMPT_DATA)"
  [[ -f "$PROMPT_DATA" ]] || glm_die "--prompt-data $PROMPT_DATA: no such file"
  # the job runs in a directory of Ray's choosing: hand it absolute paths
  for name in HF_CHECKPOINT REF_LOAD LOAD SAVE PROMPT_DATA OUTPUT_DIR; do
    [[ -z "${!name}" ]] || printf -v "$name" '%s' "$(realpath -m -- "${!name}")"
  done
  local total=0 n
  for n in "${GLM_SLOTS[@]}"; do total=$((total + n)); done
  if ((GPU_CHECK && total != RECIPE_GPUS)); then
    glm_die "$RECIPE_NAME needs $RECIPE_GPUS GPUs but $HOSTFILE has $total slots over ${#GLM_HOSTS[@]} hosts" \
      "(fix the hostfile, or pass --no-gpu-check and override the layout after --)"
  fi
  [[ "$RAY_AUTH_MODE" == token || "$RAY_AUTH_MODE" == disabled ]] ||
    glm_die "RAY_AUTH_MODE must be token or disabled (got '$RAY_AUTH_MODE')"
  GLM_AUTH_TOKEN=""
  if [[ "$RAY_AUTH_MODE" == token ]]; then
    local token="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
    GLM_AUTH_TOKEN="${RAY_AUTH_TOKEN:-}"
    if [[ -z "$GLM_AUTH_TOKEN" ]]; then
      [[ -s "$token" ]] || glm_die "RAY_AUTH_MODE=token but no token at $token: run" \
        "\`ray get-auth-token --generate\` (or set RAY_AUTH_MODE=disabled on a trusted network)"
      GLM_AUTH_TOKEN="$(<"$token")"; token="the token at $token"
    else
      token="RAY_AUTH_TOKEN"
    fi
    [[ "$GLM_AUTH_TOKEN" =~ ^[[:graph:]]+$ ]] || glm_die "$token is not one word (one line, no spaces)"
  fi
}

# -- commands ------------------------------------------------------------------------------------------------
glm_quote() { local out; printf -v out '%q ' "$@"; printf '%s' "${out% }"; }

# The shell line a host runs: Ray's auth mode, with --token the token read from stdin (token mode: it never
# appears on a command line), the user's setup, then the command, every word quoted.
glm_remote_line() {
  local line with_token=0
  [[ "$1" != --token ]] || { with_token=1; shift; }
  line="export RAY_AUTH_MODE=$(glm_quote "$RAY_AUTH_MODE")"
  if ((with_token)) && [[ "$RAY_AUTH_MODE" == token ]]; then
    line+="; IFS= read -r RAY_AUTH_TOKEN && export RAY_AUTH_TOKEN"
  fi
  [[ -z "$REMOTE_SETUP" ]] || line+="; $REMOTE_SETUP"
  printf '%s; %s' "$line" "$(glm_quote "$@")"
}

# The token line glm_remote_line --token reads (nothing when auth is disabled). Run as the first command of a
# pipeline (a subshell of its own): a remote shell that exits without reading must not kill it with SIGPIPE.
glm_token_stdin() {
  trap '' PIPE
  [[ "$RAY_AUTH_MODE" != token ]] || printf '%s\n' "$GLM_AUTH_TOKEN" 2>/dev/null || true
}

# `ray start` for node $1 (0 = head).
glm_ray_start_args() {
  local i="$1" host="${GLM_HOSTS[$1]}" slots="${GLM_SLOTS[$1]}"
  local -a args=(ray start --temp-dir "$RAY_TEMP_DIR/node$i" --disable-usage-stats)
  if ((i == 0)); then
    args+=(--head --port "$RAY_PORT" --dashboard-host "$DASHBOARD_HOST" --dashboard-port "$DASHBOARD_PORT"
           --include-dashboard true)
  else
    args+=(--address "${GLM_HOSTS[0]}:$RAY_PORT")
  fi
  [[ ! "$host" =~ ^[0-9]+(\.[0-9]+){3}$ ]] || args+=(--node-ip-address "$host")
  if ((CPU_MODE)); then args+=(--num-cpus "$slots" --num-gpus 0); else args+=(--num-gpus "$slots"); fi
  if [[ -n "$NODE_PORT_BASE" ]]; then  # distinct ports, so nodes can share one machine
    local b=$((NODE_PORT_BASE + 100 * i))
    args+=(--node-manager-port "$b" --object-manager-port $((b + 1)) --metrics-export-port $((b + 2))
           --dashboard-agent-listen-port $((b + 3)) --dashboard-agent-grpc-port $((b + 4))
           --runtime-env-agent-port $((b + 5)) --min-worker-port $((b + 10)) --max-worker-port $((b + 99)))
    ((i != 0)) || args+=(--ray-client-server-port $((b + 6)))
  fi
  printf '%s\0' "${args[@]}" "${RAY_START_EXTRA[@]}"
}

# host, command words...: through the remote shell (`--` before the host: nothing reaches it as an option), the
# token on stdin, output prefixed with the host.
glm_run_on() {
  local host="$1"; shift
  local line; line="$(glm_remote_line --token "$@")"
  if ((DRY_RUN)); then echo "$(glm_quote "${RSH[@]}" -- "$host") $(glm_quote "$line")"; return 0; fi
  glm_token_stdin | "${RSH[@]}" -- "$host" "$line" 2>&1 | glm_prefix "$host"
}

glm_prefix() {  # each line of stdin as "[$1] line" (the host is data here, never part of a sed program)
  local l
  while IFS= read -r l || [[ -n "$l" ]]; do printf '[%s] %s\n' "$1" "$l"; done
}

glm_start_node() {
  local -a args; mapfile -d '' -t args < <(glm_ray_start_args "$1")
  glm_run_on "${GLM_HOSTS[$1]}" "${args[@]}"
}

# Stops what `ray start` made under the node's temp dir (never `ray stop`, which stops every Ray on a host).
# The script and its arguments travel on stdin: a command line naming the temp dir would match itself (and the
# remote-shell client, when the launcher runs on that host).
glm_stop_node() {
  local i="$1" host="${GLM_HOSTS[$1]}" port=""
  ((i != 0)) || port="$RAY_PORT"
  local line; line="$(glm_remote_line python -)"
  local dir64; dir64="$(printf '%s' "$RAY_TEMP_DIR/node$i" | base64 -w0)"
  local argv="import base64, sys; sys.argv[1:] = [base64.b64decode('$dir64').decode(), '$port']"
  if ((DRY_RUN)); then echo "$(glm_quote "${RSH[@]}" -- "$host") $(glm_quote "$line") < ($argv; stop_ray_node.py)"
                        return 0; fi
  { echo "$argv"; cat "$GLM_LIB_DIR/stop_ray_node.py"; } | "${RSH[@]}" -- "$host" "$line" 2>&1 | glm_prefix "$host"
}

glm_stop_all() {  # every host at once (a raylet whose GCS is gone exits by itself anyway)
  local i pids=()
  for i in "${!GLM_HOSTS[@]}"; do
    if ((DRY_RUN)); then glm_stop_node "$i"; else glm_stop_node "$i" & pids+=($!); fi
  done
  for i in "${pids[@]}"; do wait "$i" || true; done
}

glm_alive_nodes() {
  local out
  out="$(ray list nodes --address "http://${GLM_HOSTS[0]}:$DASHBOARD_PORT" --filter state=ALIVE --format json \
         --limit 10000 2>/dev/null)" || { echo 0; return 0; }
  grep -o '"node_id"' <<<"$out" | wc -l || true
}

glm_wait_for_nodes() {
  local want="${#GLM_HOSTS[@]}" start=$SECONDS n
  while true; do
    n="$(glm_alive_nodes)"
    glm_log "nodes alive: $n/$want ($((SECONDS - start))s, timeout ${JOIN_TIMEOUT}s)"
    ((n < want)) || return 0
    ((SECONDS - start < JOIN_TIMEOUT)) || glm_die "only $n of $want Ray nodes joined within ${JOIN_TIMEOUT}s" \
      "(logs: $RAY_TEMP_DIR/node<i>/session_latest/logs on each host)"
    sleep 2
  done
}

# The job's environment: this repository on PYTHONPATH, NCCL/CUDA defaults (NVLink multicast off), then the
# NCCL / GLOO / UCX / Mooncake (MC_) variables and RAY_DEDUP_LOGS set where the launcher runs.
glm_runtime_env_json() {
  local -a pairs=("PYTHONPATH=$GLM_REPO_DIR${PYTHONPATH:+:$PYTHONPATH}" "CUDA_DEVICE_MAX_CONNECTIONS=1"
                  "NCCL_NVLS_ENABLE=0" "NCCL_CUMEM_ENABLE=0")
  local name
  while IFS= read -r name; do
    pairs+=("$name=${!name}")
  done < <(compgen -e | grep -E '^(NCCL_|GLOO_|TORCH_NCCL_|UCX_|MC_|RAY_DEDUP_LOGS$)' || true)
  python -c 'import json, sys
env = dict(p.split("=", 1) for p in sys.argv[1:])
print(json.dumps({"env_vars": env}, sort_keys=True))' "${pairs[@]}"
}

glm_train_args() {
  printf '%s\0' python -m glm_rl.cli train --ray-address auto "${RECIPE_ARGS[@]}" \
    --hf-checkpoint "$HF_CHECKPOINT" ${REF_LOAD:+--ref-load "$REF_LOAD"} ${LOAD:+--load "$LOAD"} \
    ${SAVE:+--save "$SAVE"} \
    --prompt-data "$PROMPT_DATA" --rm-type "$RM_TYPE" --output-dir "$OUTPUT_DIR" "${EXTRA_ARGS[@]}"
}

glm_submit() {
  local -a train; mapfile -d '' -t train < <(glm_train_args)
  local -a cmd=(ray job submit --address "http://${GLM_HOSTS[0]}:$DASHBOARD_PORT"
                --runtime-env-json "$(glm_runtime_env_json)" -- "${train[@]}")
  if ((DRY_RUN)); then glm_quote "${cmd[@]}"; echo; return 0; fi
  glm_log "submitting $RECIPE_NAME to http://${GLM_HOSTS[0]}:$DASHBOARD_PORT"
  "${cmd[@]}"
}

glm_on_exit() {
  local rc=$?
  trap - EXIT INT TERM
  glm_log "stopping the Ray nodes (exit status $rc)"
  glm_stop_all
  exit "$rc"
}

glm_main() {
  set -euo pipefail
  glm_parse_args "$@"
  glm_check_inputs
  if ((STOP_ONLY)); then glm_stop_all; return 0; fi
  if ((STOP_ON_EXIT && !DRY_RUN)); then trap glm_on_exit EXIT; trap 'exit 130' INT; trap 'exit 143' TERM; fi
  glm_log "${#GLM_HOSTS[@]} hosts; head ${GLM_HOSTS[0]}:$RAY_PORT"
  glm_start_node 0 || glm_die "ray start failed on the head ${GLM_HOSTS[0]} (see the lines above)"
  local i pids=() failed=0
  for ((i = 1; i < ${#GLM_HOSTS[@]}; i++)); do
    if ((DRY_RUN)); then glm_start_node "$i"; else glm_start_node "$i" & pids+=($!); fi
  done
  for i in "${!pids[@]}"; do  # pids[i] started node i + 1
    wait "${pids[$i]}" || { glm_log "ray start failed on ${GLM_HOSTS[$((i + 1))]}"; failed=1; }
  done
  ((failed == 0)) || glm_die "some nodes did not start (see the lines above)"
  ((DRY_RUN)) || glm_wait_for_nodes
  glm_submit
}
