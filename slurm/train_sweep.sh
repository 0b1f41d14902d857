#!/usr/bin/env bash
#SBATCH --job-name=catalog-sweep
#SBATCH --cpus-per-task=1
#SBATCH --mem=4G
#SBATCH --output=%x-%j.out
# The sweep driver, a light job: it submits one Slurm job array (one task per configuration,
# resources from the cluster profile), waits, ranks the runs and promotes the best adapter.
#
#   sbatch slurm/train_sweep.sh [SWEEP.yaml] [catalog-tuner sweep options, e.g. --output DIR]
#
# Partition, account and time of this driver: sbatch flags or SBATCH_* environment variables.
set -euo pipefail
sweep=${1:-jobs/sweeps/instacart.yaml}
shift $(( $# > 0 ? 1 : 0 ))
exec "${CATALOG_TUNER:-catalog-tuner}" sweep --sweep "$sweep" --executor slurm "$@"
