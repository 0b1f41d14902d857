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

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2
    shift 2
    for _ in $(seq $((seconds * 4))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.25
    done
    log "timed out waiting for $what (logs in $STATE/log)"
    return 1
}

install() {
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client slurmdbd munge mariadb-server >/dev/null
}

write_configs() {
    local cpus memory
    cpus=$(nproc)
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
    if ! alive "$STATE/run/slurmctld.pid"; then
        slurmctld -f "$STATE/slurm.conf"
        wait_for 60 "slurmctld" scontrol ping
    fi
    if ! alive "$STATE/run/slurmd.pid"; then
        slurmd -f "$STATE/slurm.conf"
    fi
    wait_for 60 "node $NODE to be idle" bash -c "sinfo -h -N -o %t | grep -Eq '^(idle|mix|alloc)'"
    echo "export SLURM_CONF=$STATE/slurm.conf"
}

stop() {
    export SLURM_CONF=$STATE/slurm.conf
    for pidfile in run/slurmd.pid run/slurmctld.pid run/slurmdbd.pid run/mariadb.pid munge/munged.pid; do
        if alive "$STATE/$pidfile"; then
            local pid
            pid=$(cat "$STATE/$pidfile")
            kill "$pid"
            wait_for 30 "$pidfile to exit" bash -c "! kill -0 $pid" || kill -9 "$pid" 2>/dev/null || true
        fi
    done
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
