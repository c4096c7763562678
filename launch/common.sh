# Shared by the launch scripts (sourced, not run). Needs LAUNCH_DIR and PROG set.
#
# PYTHON   the interpreter that has megapatch installed (default: python3, else python)

PYTHON=${PYTHON:-$(command -v python3 || command -v python || echo python3)}
# A command prefix for the preflight, e.g. `srun ... --container-image=...` (train.sbatch).
ON_NODE=()

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

# The training ranks below a launcher: its descendants that catch SIGUSR1 (megapatch
# installs a handler; the launchers we start ignore the signal, and a helper process
# with the default action would die of it).
ranks_below() {
    local child mask
    for child in $(pgrep -P "$1" 2>/dev/null); do
        mask=$(awk '/^SigCgt:/ {print $2}' "/proc/$child/status" 2>/dev/null) || continue
        if [ -n "$mask" ] && (((16#$mask >> 9) & 1)); then
            echo "$child"
        fi
        ranks_below "$child"
    done
}

_stop_requested() {
    echo "$PROG: received SIG$1: asking the training ranks to checkpoint and stop" >&2
    STOP_SIGNAL=$1
    _deliver_stop
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
            _deliver_stop
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
