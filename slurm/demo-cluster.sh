#!/usr/bin/env bash
# `make demo-cluster`: the flow the project exists for, on a real local Slurm cluster (root, Debian):
# a sweep as one job array -> ranked on validation -> the best promoted and scored on test ->
# a labeling array over the catalog's unlabelled products -> the morning report. It starts the
# cluster (slurm/dev-cluster.sh, installed on first use) and stops it at the end, leaving no process.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
STATE=${DEMO_CLUSTER_STATE:-/tmp/ct-demo}
SWEEP=jobs/sweeps/demo-cluster.yaml
SWEEP_DIR=runs/sweeps/demo-cluster
OUT=runs/demo-cluster-labeled
started=$SECONDS

[ "$(id -u)" = 0 ] || { echo "demo-cluster: Slurm's daemons run as root here; run as root" >&2; exit 2; }
command -v slurmctld >/dev/null || slurm/dev-cluster.sh install
export PATH="$PWD/$BIN:$PATH"  # the jobs find catalog-tuner and accelerate here
eval "$(slurm/dev-cluster.sh start "$STATE")"
trap 'slurm/dev-cluster.sh stop "$STATE" >/dev/null' EXIT

wait_for() {  # wait_for JOB WHAT: a progress line every 15 s until all its tasks have ended
    local job=$1 what=$2 last=-15 raw states
    while :; do
        raw=$(sacct -n -P -X -j "$job" -o State)
        states=$(echo "$raw" | sort | uniq -c | awk '$2 {printf "%s%s %s", sep, $1, $2; sep=", "}')
        if [ -n "$states" ] && ! echo "$raw" | grep -qE 'PENDING|RUNNING|REQUEUED|CONFIGURING|COMPLETING'; then
            echo "$what (job $job): $states, $((SECONDS - started)) s since the start"
            return
        fi
        if [ $((SECONDS - last)) -ge 15 ]; then
            echo "$what (job $job): ${states:-submitted}; queue: $(squeue -h -o '%i %T' | tr '\n' ' '); $((SECONDS - started)) s"
            last=$SECONDS
        fi
        sleep 2
    done
}

[ -f data/instacart/train.parquet ] || catalog-tuner prepare --out data/instacart >/dev/null
rm -rf "$SWEEP_DIR" "$OUT"  # each demo is a new sweep and a new labeling
mkdir -p runs
driver=$(sbatch --parsable --output="runs/demo-cluster-driver-%j.out" slurm/train_sweep.sh "$SWEEP" \
    --output "$SWEEP_DIR" --label-catalog data/instacart/to_label.parquet --label-output "$OUT" --label-array 0-1)
wait_for "$driver" "sweep driver"
if [ ! -f "$SWEEP_DIR/promoted.json" ]; then
    echo "demo-cluster: the sweep promoted nothing; its log: runs/demo-cluster-driver-$driver.out" >&2
    tail -20 "runs/demo-cluster-driver-$driver.out" >&2
    exit 1
fi
cat "$SWEEP_DIR/leaderboard.md"
label_job=$(python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['run'], d['label_job'])" \
    "$SWEEP_DIR/promoted.json")
echo "promoted: ${label_job% *} ($SWEEP_DIR/promoted)"
wait_for "${label_job#* }" "labeling array"
echo
echo "sweep report:    $SWEEP_DIR/sweep_report.html"
echo "labeling report: $OUT/_report/latest/report.html"
echo "demo-cluster: done in $((SECONDS - started)) s; stopping the cluster"
