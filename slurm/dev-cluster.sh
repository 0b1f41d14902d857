#!/usr/bin/env bash
# A real single-node Slurm cluster on localhost, for tests and demos (as root, Debian 12).
#
#   eval "$(slurm/dev-cluster.sh start [STATE_DIR])"   # idempotent; prints the export lines
#   slurm/dev-cluster.sh status [STATE_DIR]
#   slurm/dev-cluster.sh stop [STATE_DIR]
#
# Daemons: munged, a private MariaDB, slurmdbd (so that sacct works: submitit reads job states
# from it), slurmctld and slurmd, all with their files under STATE_DIR (keep its path short:
# unix socket paths are limited to 108 bytes). No systemd or cgroups: proctrack/linuxproc and
# task/none. Install the packages once with `slurm/dev-cluster.sh install`.
set -euo pipefail

command=${1:-status}
STATE=${2:-${CATALOG_TUNER_SLURM_STATE:-/tmp/ct-slurm}}
DB_PORT=${CATALOG_TUNER_SLURM_DB_PORT:-3307}
CTLD_PORT=${CATALOG_TUNER_SLURM_PORT:-6817}
NODE=$(hostname -s)

log() { echo "dev-cluster: $*" >&2; }

# A zombie is dead: a slow init may take a second or so to reap a daemon killed with kill -9.
running() { ps -o stat= -p "$1" 2>/dev/null | grep -qv '^Z'; }  # running PID
alive() { [ -f "$1" ] && running "$(cat "$1")"; }  # alive PIDFILE
exited() { ! running "$1"; }  # exited PID

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do  # a deadline, not a count: a command may hang (e.g. munged gone)
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "timed out waiting for $what (logs in $STATE/log)"
            return 1
        fi
        sleep 0.25
    done
}

# This cluster's job processes, one pid a line: its slurmstepd (slurmd passes them its environment,
# so SLURM_CONF=$STATE/slurm.conf) and what runs in its jobs (slurmd sets SLURM_CONF and
# SLURM_JOB_ID for them), plus every descendant of those slurmstepd (a job may clear its
# environment). Another dev cluster has another SLURM_CONF; the daemons and the caller's shell have
# this one but no SLURM_JOB_ID. Never this script, its ancestors or its own subshells.
job_processes() {
    local environ pid roots=()
    for environ in $(grep -lzxF "SLURM_CONF=$STATE/slurm.conf" /proc/[0-9]*/environ 2>/dev/null); do
        pid=${environ#/proc/}
        pid=${pid%/environ}
        if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = slurmstepd ] || grep -qzx 'SLURM_JOB_ID=[0-9]*' "$environ" 2>/dev/null; then
            roots+=("$pid")
        fi
    done
    [ ${#roots[@]} -gt 0 ] || return 0
    ps -e -o pid= -o ppid= -o stat= | awk -v roots="${roots[*]}" -v self=$$ '
        { parent[$1] = $2; if ($3 ~ /^Z/) zombie[$1] = 1 }
        function closure(set,   p, grown) {  # adds the descendants of set to set
            do { grown = 0; for (p in parent) if (!(p in set) && (parent[p] in set)) { set[p] = 1; grown = 1 } } while (grown)
        }
        END {
            n = split(roots, r, " "); for (i = 1; i <= n; i++) job[r[i]] = 1
            closure(job)
            mine[self] = 1; closure(mine)
            for (p = self; p > 1 && (p in parent); p = parent[p]) mine[parent[p]] = 1
            for (p in job) if (!(p in mine) && !(p in zombie)) print p
        }'
}

tasks_ended() {  # tasks_ended PID...: none of them runs, but slurmstepd (they ignore SIGTERM)
    local pid
    for pid; do
        case $(ps -o stat=,comm= -p "$pid" 2>/dev/null) in "" | Z* | *slurmstepd) ;; *) return 1 ;; esac
    done
}

kill_job_processes() {  # what Slurm did not end (its daemons gone, or KillWait exceeded)
    local pids
    mapfile -t pids < <(job_processes)
    [ ${#pids[@]} -gt 0 ] || return 0
    log "killing leftover job processes: ${pids[*]}"
    # SIGTERM first, so that a training run can still save a checkpoint; SIGKILL for the rest.
    kill "${pids[@]}" 2>/dev/null || true
    wait_for 10 "leftover job processes to end" tasks_ended "${pids[@]}" || true
    kill -9 "${pids[@]}" 2>/dev/null || true
    wait_for 10 "leftover job processes to be killed" no_job_processes || true
}

no_job_processes() { [ -z "$(job_processes)" ]; }

no_jobs_left() {  # true once the queue is empty; cancels what is not yet ending (a sweep driver may still submit)
    local queue ending
    queue=$(squeue -h -o "%F %t") || return 1  # %F: an array's tasks all under its array job id
    [ -n "$queue" ] || return 0
    mapfile -t ending < <(awk '$2 != "CG" {print $1}' <<<"$queue" | sort -u)
    [ ${#ending[@]} -eq 0 ] || scancel "${ending[@]}" 2>/dev/null || true
    return 1
}

install() {
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client slurmdbd munge mariadb-server >/dev/null
}

write_configs() {
    local cpus memory
    # the cores this process may use, not OMP_NUM_THREADS: nproc obeys it, and a shell (or a test
    # worker) that limits its own threads would have made a node too small for a sweep's array
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
    memory=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    mkdir -p "$STATE"/{munge,log,run,db,spool/ctld,spool/d}
    chmod 755 "$STATE" "$STATE/munge"  # munge clients must reach the socket
    if [ ! -f "$STATE/munge/munge.key" ]; then
        head -c 1024 /dev/urandom >"$STATE/munge/munge.key"
        chmod 400 "$STATE/munge/munge.key"
    fi
    cat >"$STATE/slurm.conf" <<EOF
ClusterName=catalog
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$((CTLD_PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$STATE/munge/munge.socket,cred_expire=10
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$((CTLD_PORT + 2))
AccountingStoragePass=$STATE/munge/munge.socket
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MinJobAge=300
KillWait=30
InactiveLimit=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    cat >"$STATE/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$STATE/munge/munge.socket
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$((CTLD_PORT + 2))
SlurmUser=root
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=root
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$STATE/slurmdbd.conf"
}

start() {
    [ "$(id -u)" = 0 ] || { log "needs root"; exit 1; }
    command -v slurmctld >/dev/null || { log "Slurm is not installed: run '$0 install' first"; exit 1; }
    write_configs
    export SLURM_CONF=$STATE/slurm.conf

    if ! alive "$STATE/munge/munged.pid"; then
        munged --force --key-file="$STATE/munge/munge.key" --socket="$STATE/munge/munge.socket" \
            --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/log/munged.log" \
            --seed-file="$STATE/munge/munged.seed"
    fi
    if ! alive "$STATE/run/mariadb.pid"; then
        if [ ! -d "$STATE/db/mysql" ]; then
            mariadb-install-db --datadir="$STATE/db" --user=root --auth-root-authentication-method=normal \
                --skip-test-db >"$STATE/log/mariadb-install.log" 2>&1
        fi
        # Private instance: loopback only, no grant checks (it holds only this cluster's accounting).
        setsid mariadbd --datadir="$STATE/db" --user=root --port="$DB_PORT" --bind-address=127.0.0.1 \
            --socket="$STATE/run/mariadb.sock" --pid-file="$STATE/run/mariadb.pid" --skip-grant-tables \
            --log-error="$STATE/log/mariadb.log" </dev/null >/dev/null 2>&1 &
        wait_for 60 "MariaDB" mariadb-admin --socket="$STATE/run/mariadb.sock" ping
    fi
    if ! alive "$STATE/run/slurmdbd.pid"; then
        slurmdbd  # reads slurmdbd.conf beside $SLURM_CONF
        wait_for 60 "slurmdbd" sacctmgr -n show cluster
    fi
    sacctmgr -i -Q add cluster catalog >/dev/null 2>&1 || true
    local fresh=false last_job
    if ! alive "$STATE/run/slurmctld.pid"; then
        # Not a restart of a running cluster: whatever still runs of its jobs is left from an unclean
        # stop, and nothing will ever collect it.
        fresh=true
        kill_job_processes
        # A killed slurmctld loses the job id counter of its last seconds: go on past every job id
        # that accounting knows, or sacct -j would mix an old job with a new one.
        last_job=$(mariadb --socket="$STATE/run/mariadb.sock" -N -e \
            "SELECT MAX(id_job) FROM slurm_acct_db.catalog_job_table" 2>/dev/null || true)
        if [[ $last_job =~ ^[0-9]+$ ]]; then echo "FirstJobId=$((last_job + 1))" >>"$STATE/slurm.conf"; fi
        slurmctld -f "$STATE/slurm.conf"
        wait_for 60 "slurmctld" scontrol ping
    fi
    if ! alive "$STATE/run/slurmd.pid"; then
        slurmd -f "$STATE/slurm.conf"
    fi
    if $fresh; then
        # slurmctld restored the jobs of its last run from its state files: running ghosts without
        # processes that would hold the node forever. Cancel them (slurmd must be up to complete them)
        # and put the node back in service. The state folder stays: job ids and accounting go on.
        wait_for 60 "stale jobs to be cancelled" no_jobs_left
        if sinfo -h -N -o %t | grep -Eq 'drain|drng|down|fail'; then
            scontrol update nodename="$NODE" state=resume 2>/dev/null || true
        fi
        wait_for 60 "node $NODE to be idle" bash -c "sinfo -h -N -o %t | grep -Eq '^idle$'"
    else
        wait_for 60 "node $NODE to be idle" bash -c "sinfo -h -N -o %t | grep -Eq '^(idle|mix|alloc)'"
    fi
    echo "export SLURM_CONF=$STATE/slurm.conf"
}

stop() {
    export SLURM_CONF=$STATE/slurm.conf
    # slurmstepd outlive slurmd by design: end the jobs through Slurm first (SIGTERM, then SIGKILL
    # after KillWait=30 s), while slurmctld and slurmd are there to do it.
    if alive "$STATE/run/slurmctld.pid" && alive "$STATE/run/slurmd.pid"; then
        wait_for 60 "jobs to end" no_jobs_left || true
    fi
    for pidfile in run/slurmd.pid run/slurmctld.pid run/slurmdbd.pid run/mariadb.pid munge/munged.pid; do
        if alive "$STATE/$pidfile"; then
            local pid
            pid=$(cat "$STATE/$pidfile")
            kill "$pid"
            wait_for 30 "$pidfile to exit" exited "$pid" || kill -9 "$pid" 2>/dev/null || true
        fi
    done
    kill_job_processes  # steps Slurm could not end in time, or a cluster whose daemons were already gone
}

status() {
    export SLURM_CONF=$STATE/slurm.conf
    for pidfile in munge/munged.pid run/mariadb.pid run/slurmdbd.pid run/slurmctld.pid run/slurmd.pid; do
        if alive "$STATE/$pidfile"; then echo "running  $pidfile"; else echo "stopped  $pidfile"; fi
    done
    alive "$STATE/run/slurmctld.pid" && sinfo || true
}

case "$command" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 install|start|stop|status [STATE_DIR]" >&2; exit 2 ;;
esac
