"""Sweep driver: ``python jobs/train_sweep.py --sweep jobs/sweeps/instacart.yaml [...]``.

The same as ``catalog-tuner sweep``; slurm/train_sweep.sh runs it as a light (1 CPU) job that
submits the training array through submitit and ranks the results.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
