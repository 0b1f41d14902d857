"""Label a catalog shard: ``python jobs/label_catalog.py --adapter RUN_DIR --catalog PATH --output OUT``.

The same as ``catalog-tuner label``; inside a Slurm array (slurm/label_catalog.sh) each task
takes its shard from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["label", *sys.argv[1:]]))
