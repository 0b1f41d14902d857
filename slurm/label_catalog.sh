#!/usr/bin/env bash
#SBATCH --job-name=catalog-label
#SBATCH --array=0-3
#SBATCH --cpus-per-task=2
#SBATCH --output=%x-%A_%a.out
#SBATCH --requeue
# Label a catalog as a job array: task I of N labels shard I/N (from SLURM_ARRAY_TASK_ID/COUNT).
#
#   sbatch [--array=0-N] slurm/label_catalog.sh CATALOG OUT_DIR [catalog-tuner label options]
#
# The adapter: $CATALOG_TUNER_ADAPTER (default: the promoted run of the default sweep).
# Preemption: Slurm sends SIGTERM; the labeler commits the record batch in hand and exits, and
# --requeue brings the task back to resume from its last committed batch (OUT_DIR/_partial).
set -euo pipefail
if [ $# -lt 2 ]; then echo "usage: sbatch slurm/label_catalog.sh CATALOG OUT_DIR [options]" >&2; exit 2; fi
catalog=$1 out=$2
shift 2
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}  # no cgroups: do not oversubscribe the node
exec "${CATALOG_TUNER:-catalog-tuner}" label --adapter "${CATALOG_TUNER_ADAPTER:-runs/sweeps/instacart/promoted}" \
    --catalog "$catalog" --output "$out" "$@"
