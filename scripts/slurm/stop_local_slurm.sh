#!/usr/bin/env bash
# Stop the daemons started by start_local_slurm.sh (slurmd, slurmctld, munged),
# using the pid files in the state dir, and wait until they are gone.
# Idempotent: missing/stale pid files are fine.  Daemons not started by the
# start script (e.g. a system munged) are never touched.
set -uo pipefail

STATE_DIR="${SLURM_LOCAL_DIR:-/tmp/stitching-slurm}"
WAIT_S="${SLURM_LOCAL_STOP_TIMEOUT:-20}"

log() { echo "[stop_local_slurm] $*" >&2; }

# The pid must still belong to the expected program (pids get reused).
is_ours() {  # pid name
    local comm
    comm="$(cat "/proc/$1/comm" 2>/dev/null)" || return 1
    [[ "$comm" == "$2"* ]]
}

stop_one() {  # name pidfile
    local name="$1" pidfile="$2" pid
    [[ -s "$pidfile" ]] || { log "$name: no pid file"; return 0; }
    pid="$(cat "$pidfile" 2>/dev/null)"
    if ! [[ "$pid" =~ ^[0-9]+$ ]] || ! is_ours "$pid" "$name"; then
        log "$name: not running (stale pid file)"
        rm -f "$pidfile"
        return 0
    fi
    log "$name: stopping pid $pid"
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + WAIT_S))
    while is_ours "$pid" "$name" && ((SECONDS < deadline)); do sleep 0.2; done
    if is_ours "$pid" "$name"; then
        log "$name: still alive after ${WAIT_S}s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        while is_ours "$pid" "$name"; do sleep 0.1; done
    fi
    rm -f "$pidfile"
}

# Cancel the jobs still on the local cluster first, so that no job processes
# (slurmstepd and its children) outlive the daemons.  SLURM_LOCAL_KEEP_JOBS=1
# keeps them (slurmctld saves them in its state dir and recovers them).
if [[ "${SLURM_LOCAL_KEEP_JOBS:-0}" != 1 && -s "$STATE_DIR/slurmctld.pid" ]] \
        && is_ours "$(cat "$STATE_DIR/slurmctld.pid")" slurmctld; then
    export SLURM_CONF="$STATE_DIR/slurm.conf"
    jobs="$(squeue -h -o '%A' 2>/dev/null | sort -u | tr '\n' ' ')"
    if [[ -n "${jobs// /}" ]]; then
        log "cancelling jobs: $jobs"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
        deadline=$((SECONDS + WAIT_S))
        while [[ -n "$(squeue -h -o '%A' 2>/dev/null)" ]] && ((SECONDS < deadline)); do
            sleep 0.5
        done
    fi
fi

# Order: compute node first, then controller, then authentication.
stop_one slurmd "$STATE_DIR/slurmd.pid"
stop_one slurmctld "$STATE_DIR/slurmctld.pid"
stop_one munged "$STATE_DIR/munge/munged.pid"
exit 0
