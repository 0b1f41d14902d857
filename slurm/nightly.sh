#!/usr/bin/env bash
#SBATCH --job-name=catalog-nightly
#SBATCH --cpus-per-task=1
#SBATCH --time=00:10:00
#SBATCH --output=%x-%j.out
# Nightly labeling where a site has no scrontab: this job first queues its own next run with
# --begin (so one failed night does not end the schedule), then submits the labeling array.
#
#   sbatch slurm/nightly.sh CATALOG OUT_DIR [catalog-tuner label options]
#
# NIGHTLY_AT (default 02:00) is when the next run starts, NIGHTLY_ARRAY (default 0-3) the shards,
# NIGHTLY_LOGS (default: the submit directory) where the job logs go.
set -euo pipefail
at=${NIGHTLY_AT:-02:00}
self=${NIGHTLY_SCRIPT:-slurm/nightly.sh}
logs=${NIGHTLY_LOGS:-.}
next=$(sbatch --parsable --begin="$at" --output="$logs/catalog-nightly-%j.out" "$self" "$@")
echo "next nightly run: job $next at $at"
sbatch --parsable --array="${NIGHTLY_ARRAY:-0-3}" --output="$logs/catalog-label-%A_%a.out" \
    slurm/label_catalog.sh "$@" --only-missing
