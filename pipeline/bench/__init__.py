"""Benchmarks that print JSON; numbers, never asserts.

``python -m pipeline.bench label --adapter RUN_DIR --data DATA_DIR [--products N] [--levers ...]``
    the tutorial's free generation vs the constrained labeler on each inference path (float32,
    compiled, int8 dynamic, bf16, and ``auto``: what the recipe resolves to here) on the same
    validation products, same adapter, same process: products/s, speedup, accuracy, agreement with
    float32, achieved GFLOP/s against the fp32 and bf16 matmul peaks measured in the same run and
    against the model's own matrix shapes at the labeler's batch (its ceiling); then batch sizes
    and thread counts on the auto path.
``python -m pipeline.bench profile --adapter RUN_DIR [--levers float32 float32+compiled int8-dynamic bfloat16]``
    one labeling batch under torch.profiler on each inference path: the top operators by self CPU
    time and their share, and the share of matrix products.
``python -m pipeline.bench label-processes --adapter RUN_DIR [--rows N] [--layouts 1 2]``
    one catalog labeled by P concurrent ``catalog-tuner label --shard i/P`` processes sharing the
    CPUs, per P: wall-clock rows/s, start and model load included (what ``--cpus-per-task`` to ask).
``python -m pipeline.bench scorers --adapter RUN_DIR --data DATA_DIR [--products N] [--tolerances ...] [--dtype D]``
    how scoring cost grows with the label set, same model, products and path (fp32), one process: the 20
    departments (first-token), the aisles (trie scorer, and the full scorer on fewer products),
    and a synthetic 1,000-label taxonomy (trie): products/s and label-tree sizes; then the trie
    search labeling runs, per tolerance (in an aisle-level run's shipped space), against the
    exact answers: products/s, labels scored per product, top labels equal, largest error.
``python -m pipeline.bench quality --run RUN_DIR``
    refits the run's calibration on validation (blend and temperature), evaluates validation and
    test, and records what the run ships against the adapter alone and the baseline: accuracy,
    macro-F1, paired-bootstrap intervals, calibration, and the departments still behind.
``python -m pipeline.bench cost --run RUN_DIR [--products N]``
    each shippable candidate the run's calibration scored, timed here on the first N validation
    products: products/s, core-hours per million rows, and its validation accuracy and macro-F1.
``python -m pipeline.bench train --config RECIPE [--minutes M] [--stop-at A] [--eval-every K] [key=value ...]``
    trains a recipe for a fixed budget (of training time, evaluations excluded) and records
    throughput (s/step, examples/s, tokens/s) and the accuracy curve on a fixed slice of validation
    (the first ``--eval-samples`` products, at the recipe's ``data.label_level``; test where
    DATA_DIR has no validation rows), then the final metrics of the recipe's ``eval.splits``
    (with ``eval.max_samples`` rows, and for an aisle-level run the departments it implies);
    ``--stop-at`` ends it once a curve point reaches that accuracy.
``python -m pipeline.bench profile-train [--config RECIPE] [--warmup 3] [--timed 5] [--steps 5] [key=value ...]``
    a few steps of a recipe trained as ``catalog-tuner train`` trains it: seconds per step outside
    and under torch.profiler, the share of each step in data, forward (``compute_loss``), backward,
    clipping and the optimizer, the top operators by self CPU time, the time in bitsandbytes'
    4-bit dequantization, and the padding share of the batches.
``python -m pipeline.bench label-memory --adapter RUN_DIR --data DATA_DIR --rows 10000 100000``
    peak memory of ``catalog-tuner label`` on synthetic catalogs of growing size (one fresh
    process per size); ``--new-fraction 0.01`` pre-labels the rest, like a nightly
    ``--only-missing`` run.
``python -m pipeline.bench label-overlap --adapter RUN_DIR --data DATA_DIR [--rows N] [--batch-size B]``
    ``catalog-tuner label`` with ``label.overlap`` off and on (preparing and committing record
    batches in threads beside the model), alternating, best of ``--repeats``: rows/s each.
``python -m pipeline.bench label-repro --adapter RUN_DIR --data DATA_DIR [--env MKL_DYNAMIC=FALSE ...]``
    the same small catalog labeled in fresh ``catalog-tuner label`` processes with ``label.overlap``
    on, under the default environment and each ``--env`` variant: per process, the rows whose
    confidence differs from one batch at a time in the same environment, and by how much.
``python -m pipeline.bench gpu --architecture DIR [--steps 60] [--batch-sizes ...] --output F``
    one short script for a GPU node (``make gpu-bundle`` packs what it needs), on random weights
    of the architecture in DIR: NF4 QLoRA training tokens/s of the default and the tutorial's
    recipe, the labeler's products/s per batch size in bf16 (and fp32; best of three passes),
    ``label-overlap``, ``catalog-tuner label`` end to end on a synthetic catalog, and the scorers
    on 20, 134 and 1,000 labels.

Every result records the command that made it (``command``), the resolved recipe it measured
(``config``) and the machine (``machine``: CPU model and flags, threads, matmul peaks measured in
the same process). Error analysis lives in ``pipeline.analysis``.
"""
