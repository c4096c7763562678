# Shared by the launch scripts (sourced, not run). Needs LAUNCH_DIR and PROG set.
#
# PYTHON   the interpreter that has megapatch installed (default: python3, else python)

PYTHON=${PYTHON:-$(command -v python3 || command -v python || echo python3)}
# A command prefix for the preflight, e.g. `srun ... --container-image=...` (train.sbatch).
ON_NODE=()
# The function run_launcher calls to signal the training ranks (see there).
DELIVER_STOP=_deliver_stop

die() {
    echo "$PROG: error: $*" >&2
    exit 2
}

# Check the config against what this launch has and set NNODES, NPROC_PER_NODE,
# WORLD_SIZE, RUN_DIR, DEVICE_KIND, HOSTS and (when known) NODE_RANK and MASTER_ADDR.
# Exits with the preflight's one-line error before anything starts.
preflight() {
    local out
    out=$("${ON_NODE[@]}" "$PYTHON" "$LAUNCH_DIR/preflight.py" --prog "$PROG" "$@") || exit $?
    eval "$out"
}

# Whether process $1 catches SIGUSR1 (megapatch's ranks install a handler; the launchers
# we start ignore the signal, and a helper process with the default action would die of it).
# Builtins only: stop_tagged_ranks signals right after asking.
catches_usr1() {
    local key value
    while read -r key value; do
        if [ "$key" = SigCgt: ]; then
            (((16#$value >> 9) & 1))
            return
        fi
    done 2>/dev/null <"/proc/$1/status"
    return 1
}

# The training ranks below a launcher: its descendants that catch SIGUSR1.
ranks_below() {
    local child
    for child in $(pgrep -P "$1" 2>/dev/null); do
        if catches_usr1 "$child"; then
            echo "$child"
        fi
        ranks_below "$child"
    done
}

# The value of variable $2 in the environment process $1 started with.
_environ_of() {
    local item
    while IFS= read -r -d '' item; do
        if [[ $item == "$2="* ]]; then
            echo "${item#*=}"
            return 0
        fi
    done 2>/dev/null <"/proc/$1/environ"
    return 1
}

# Run on a node over ssh (deepspeed.sh --hostfile, through pdsh): the training ranks of one
# launch on this node, found by MEGAPATCH_LAUNCH_ID=$1 in their environment (deepspeed.sh
# forwards it to the nodes' launchers and ranks, and to nothing else): the tagged processes
# that came in over ssh to the address this helper's own session came in on (which tells
# apart "nodes" that share one machine) and whose parent does not catch SIGUSR1 (a rank's
# children, data-loader workers, inherit its handler). With $2 = USR1, each rank gets
# SIGUSR1 once, as soon as it catches it; with $2 = 0, none. Returns once none of the
# launch's processes is left here (at once if none has started): with USR1, 0 if it
# signalled a rank.
stop_tagged_ranks() {
    local tag="MEGAPATCH_LAUNCH_ID=$1" signal=${2:-USR1} signalled=" " here session file pid ppid
    local -a tagged
    local -A catching
    # SSH_CONNECTION: the client's address and port, then the server's.
    read -r _ _ here _ <<<"${SSH_CONNECTION:-}"
    while :; do
        mapfile -t tagged < <(grep -lxzF -e "$tag" /proc/[0-9]*/environ 2>/dev/null)
        catching=()
        for file in "${tagged[@]}"; do
            pid=${file#/proc/}
            pid=${pid%/environ}
            if [ -n "$here" ]; then
                read -r _ _ session _ <<<"$(_environ_of "$pid" SSH_CONNECTION)"
                [ "$session" = "$here" ] || continue
            fi
            if catches_usr1 "$pid"; then catching[$pid]=1; else catching[$pid]=0; fi
        done
        if [ "${#catching[@]}" -eq 0 ]; then
            [ "$signal" = 0 ] || [ "$signalled" != " " ]
            return
        fi
        for pid in "${!catching[@]}"; do
            [ "$signal" != 0 ] && [ "${catching[$pid]}" = 1 ] || continue
            case $signalled in *" $pid "*) continue ;; esac
            ppid=$(_status_of "$pid" PPid) || continue
            [ "${catching[$ppid]:-0}" = 0 ] || continue
            # Asked again right before the signal: a rank past its last step restores the
            # default action, which would kill it.
            if catches_usr1 "$pid" && kill "-$signal" "$pid" 2>/dev/null; then
                signalled="$signalled$pid "
                echo "$PROG: asked rank $(_environ_of "$pid" RANK || echo '?') (pid $pid) to checkpoint and stop"
            fi
        done
        sleep 1
    done
}

# The value of field $2 of /proc/$1/status.
_status_of() {
    local key value
    while read -r key value; do
        if [ "$key" = "$2:" ]; then
            echo "$value"
            return 0
        fi
    done 2>/dev/null <"/proc/$1/status"
    return 1
}

_stop_requested() {
    echo "$PROG: received SIG$1: asking the training ranks to checkpoint and stop" >&2
    STOP_SIGNAL=$1
    "$DELIVER_STOP"
}

# Signal each rank once; ranks still starting up get it when they appear.
_deliver_stop() {
    local pid
    [ -n "$LAUNCHER_PID" ] || return 0
    for pid in $(ranks_below "$LAUNCHER_PID"); do
        case $SIGNALLED in *" $pid "*) continue ;; esac
        kill -USR1 "$pid" 2>/dev/null && SIGNALLED="$SIGNALLED$pid "
    done
}

_running() { # alive and not a zombie waiting to be reaped
    local state
    state=$(awk '/^State:/ {print $2}' "/proc/$1/status" 2>/dev/null) || return 1
    [ -n "$state" ] && [ "$state" != Z ]
}

# Run a launcher command and wait for it. SIGUSR1 and SIGTERM sent to this script become
# SIGUSR1 to the training ranks, which checkpoint at the next step boundary and exit 0
# (status "preempted"). The launcher itself ignores SIGUSR1, so it outlives its ranks even
# when a scheduler signals every process of the job at once (srun, scancel --signal).
# DELIVER_STOP names the function that signals the ranks (default: those below the
# launcher on this node); it is called at the signal and then every second until the
# launcher exits, so ranks still starting up get it too.
run_launcher() {
    STOP_SIGNAL="" SIGNALLED=" " LAUNCHER_PID=""
    trap '_stop_requested USR1' USR1
    trap '_stop_requested TERM' TERM
    (
        trap '' USR1
        trap - TERM
        exec "$@"
    ) &
    LAUNCHER_PID=$!
    local rc
    while :; do
        if [ -n "$STOP_SIGNAL" ] && _running "$LAUNCHER_PID"; then
            "$DELIVER_STOP"
            sleep 1
            continue
        fi
        rc=0
        wait "$LAUNCHER_PID" || rc=$?
        # A trapped signal interrupts `wait` with a status above 128; keep waiting.
        if [ "$rc" -gt 128 ] && _running "$LAUNCHER_PID"; then
            continue
        fi
        break
    done
    trap - USR1 TERM
    return "$rc"
}

# Option values: `need_value "$@"` inside an option loop, with the option in $1.
need_value() {
    [ $# -ge 2 ] && [ -n "$2" ] || die "option $1 needs a value (see --help)"
}
need_int() {
    need_value "$@"
    [[ $2 =~ ^[0-9]+$ ]] || die "option $1 $2: expected a whole number"
}

# Print the comment block at the top of a script (after the #! line) as its help.
usage() {
    awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$1"
}
