"""The training stage: QLoRA SFT of a causal LM on ``"<name> ->:"`` -> ``" <department><eos>"``.

Reads top to bottom: parse config, load data, load model, train (resuming from the last
checkpoint in RUN_DIR), save the run directory, evaluate. RUN_DIR holds ``adapter/``,
``labels.json``, ``config.yaml``, ``metrics.json``, ``train_log.json``, ``loss.png`` and,
while training, ``checkpoints/``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from datasets import Dataset
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainerState, set_seed
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import TrainOutput, get_last_checkpoint
from trl import SFTConfig, SFTTrainer

from pipeline import tracking
from pipeline.atomic import shared_mode
from pipeline.config import Recipe, load_recipe, save_recipe
from pipeline.curve import AccuracyCurve, examples_per_step
from pipeline.data import (
    adopt_prepared_columns,
    level_labels,
    prepare,
    prepare_options,
    read_split,
    to_prompt_completion,
)
from pipeline.errors import STOP_FILE, ConfigError, DataError, TrainingInterrupted
from pipeline.model import (
    adapter_dtype,
    fit_embeddings,
    load_base_model,
    load_tokenizer,
    peft_lora_config,
    resolve_base_model,
    resolve_compute_dtype,
    train_device,
    training_path,
)
from pipeline.objective import OBJECTIVES, LabelSoftmaxTrainer, first_token_ids
from pipeline.progress import LOG_INTERVAL_S, on_terminal
from pipeline.scoring import completion_texts
from pipeline.signals import StopOnSignal

log = logging.getLogger(__name__)

# Sections whose change makes an existing checkpoint the wrong starting point...
TRAINING_SECTIONS = ("data", "model", "lora", "train")
# ...except these keys, which a resumed run may change (train longer, save more often, move data).
RESUME_SAFE_KEYS = {"data.dir", "train.max_steps", "train.num_train_epochs", "train.save_steps",
                    "train.save_total_limit", "train.logging_steps", "train.dataloader_num_workers",
                    "train.curve_every", "train.curve_samples", "train.stop_at"}


class CheckpointAndStop(TrainerCallback):
    """Save a checkpoint and stop at the next step end when asked, so a requeued job resumes
    where this one stopped instead of at the last periodic checkpoint.

    Asked by SIGTERM, SIGUSR1 or SIGUSR2 (Slurm's requeue or preemption, or the ``--signal`` that
    submitit asks for before the time limit: Slurm sends it to every process of the job), or by
    the file RUN_DIR/STOP, which reaches the process through accelerate or a container on any
    node. RUN_DIR/STOP is removed once the checkpoint is written.

    The handlers hold until training ends (:meth:`restore_signals`). After it, nothing would act
    on the request: a SIGTERM during the evaluation that follows was logged and ignored until
    Slurm's SIGKILL. With the previous handlers back it ends the process, and the requeued run
    finds its final checkpoint and goes straight to the evaluation.
    """

    def __init__(self, stop_file: Path) -> None:
        self.stop_file = stop_file
        self.trainer = None
        self.signals = StopOnSignal("checkpointing at the end of this step").install()
        self.stop_file_seen = False

    @property
    def requested(self) -> bool:
        return bool(self.signals.requested) or self.stop_file_seen

    def restore_signals(self) -> None:
        self.signals.restore()

    def on_train_end(self, args, state, control, **kwargs):
        self.restore_signals()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        self.stop_file_seen = self.stop_file_seen or self.stop_file.exists()
        if self.requested:
            control.should_save = True
            control.should_training_stop = True
            if self.trainer is not None:
                # Slurm signals every process of the job: W&B's service is gone, and logging to it
                # (which precedes the save) would fail or hang the checkpoint.
                from transformers.integrations import WandbCallback

                self.trainer.remove_callback(WandbCallback)
        return control


class NoPickledArguments(TrainerCallback):
    """Delete the ``training_args.bin`` transformers writes into every checkpoint.

    It is a pickle of the TrainingArguments, which resuming never reads (the recipe in
    RUN_DIR/config.yaml is the record), and run folders are shared: a pickle there is code that
    whoever loads it runs. The optimizer, scheduler and RNG states stay: transformers loads them
    with ``torch.load(weights_only=True)``, which rebuilds tensors and plain containers only.
    """

    def on_save(self, args, state, control, **kwargs):
        (Path(args.output_dir) / f"checkpoint-{state.global_step}" / "training_args.bin").unlink(missing_ok=True)
        return control


class StepLines(TrainerCallback):
    """Off a terminal (a Slurm ``.out`` file), where the trainer's bar is off (:func:`sft_config`):
    one log line every ``LOG_INTERVAL_S`` seconds and at the end, with the step, the last logged
    loss, the time a step takes and the time left."""

    def __init__(self) -> None:
        self.started, self.first_step, self.last_line, self.loss = 0.0, 0, 0.0, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = self.last_line = time.monotonic()
        self.first_step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.loss = (logs or {}).get("loss", self.loss)

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() - self.last_line >= LOG_INTERVAL_S:
            self.line(state)

    def on_train_end(self, args, state, control, **kwargs):
        self.line(state)

    def line(self, state: TrainerState) -> None:
        self.last_line = time.monotonic()
        done = state.global_step - self.first_step
        per_step = (self.last_line - self.started) / done if done else 0.0
        loss = f"{self.loss:.4f}" if isinstance(self.loss, float) else "-"
        log.info("training: step %d/%d (%.0f%%), loss %s, %.2f s/step, %.0f s left", state.global_step,
                 state.max_steps, 100 * state.global_step / max(1, state.max_steps), loss, per_step,
                 per_step * (state.max_steps - state.global_step))


PATCHED_TRL = "1.16."
"""The trl release whose private ``trl.trainer.utils._use_triton`` the patch below replaces
(tests/test_train.py pins its source)."""


def project_labelled_positions_only() -> None:
    """Make trl's fused LM head project only the positions that carry a label, on CPU too.

    trl 1.16 compacts to the labelled positions on Triton devices and projects every position
    elsewhere, so that compilers such as Neuron's see one shape per batch. CPU eager has nothing
    to recompile, and here the prompt is most of each example (about 10 of 12 tokens) while the
    49k-word LM head is a fifth of the model's FLOPs: projecting every position spends most of
    that fifth on tokens whose logits are thrown away. The loss and gradients are the same
    (tested); only the work on masked positions goes.
    """
    import trl
    import trl.trainer.utils as trl_utils

    if not trl.__version__.startswith(PATCHED_TRL) or not hasattr(trl_utils, "_use_triton"):
        log.warning("train.completion_only_logits was written for trl %s (installed: %s): left off, every position "
                    "goes through the LM head", PATCHED_TRL, trl.__version__)
        return
    from trl.kernels.chunked_logprob import _use_triton

    trl_utils._use_triton = lambda device: device.type == "cpu" or _use_triton(device)


def cast_trainable_parameters(model, dtype: torch.dtype) -> None:
    """Put the trained weights (the adapter) in ``dtype``, leaving the frozen, packed base alone.

    Before the optimizer exists, so its state follows; a resumed run's saved state is cast to the
    parameters' dtype by torch on loading.
    """
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.to(dtype)


def ensure_prepared(recipe: Recipe) -> Path:
    """Return DATA_DIR, preparing it from the recipe's data section if it is missing."""
    data_dir = Path(recipe.data.dir)
    summary_path = data_dir / "prepare.json"
    if not (data_dir / "train.parquet").is_file():
        log.info("preparing %s from data.source=%s", data_dir, recipe.data.source)
        prepare(recipe.data, data_dir)
    elif summary_path.is_file():
        options = json.loads(summary_path.read_text()).get("options", {})
        wanted = prepare_options(recipe.data)
        differing = {k: (options.get(k), v) for k, v in wanted.items() if options.get(k) != v}
        if differing:
            raise DataError(f"{summary_path}: prepared with other options than the recipe's "
                            f"(prepared, recipe): {differing}; use another data.dir")
    return data_dir


def check_resumable(run: Path, recipe: Recipe, device: str) -> None:
    """Refuse to resume a checkpoint that another recipe wrote, or that trained on another path
    (``training_path``: a run begun on a GPU node does not resume on a CPU one)."""
    saved_path = run / "config.yaml"
    if not saved_path.is_file():
        return
    saved_recipe = load_recipe(saved_path)  # a key added since the run was saved counts as its default
    saved = dataclasses.replace(saved_recipe, model=training_path(saved_recipe.model, device)).to_dict()
    current = dataclasses.replace(recipe, model=training_path(recipe.model, device)).to_dict()
    changed = [f"{s}.{k}" for s in TRAINING_SECTIONS for k in current[s]
               if saved[s][k] != current[s][k] and f"{s}.{k}" not in RESUME_SAFE_KEYS]
    if changed:
        raise ConfigError(f"{run} holds a run of another recipe (differs in {', '.join(changed)}); "
                         "use a new --output or delete it")


def sft_config(recipe: Recipe, run: Path, device: str) -> SFTConfig:
    t = recipe.train
    on_cuda = device.startswith("cuda")
    optim, bf16, fp16 = t.optim, t.bf16, t.fp16
    if optim.startswith("paged_") and not on_cuda:
        log.warning("optim=%s pages optimizer state through CUDA unified memory; on %s using adamw_torch",
                    optim, device)
        optim = "adamw_torch"
    if fp16 and not on_cuda:
        log.warning("fp16 mixed precision needs CUDA; training in full precision on %s", device)
        fp16 = False
    return SFTConfig(
        output_dir=str(run / "checkpoints"),
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        max_grad_norm=t.max_grad_norm,
        optim=optim,
        weight_decay=t.weight_decay,
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_steps=t.max_steps,
        num_train_epochs=t.num_train_epochs,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        logging_steps=t.logging_steps,
        seed=t.seed,
        bf16=bf16,
        fp16=fp16,
        gradient_checkpointing=t.gradient_checkpointing,
        torch_compile=t.torch_compile,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        dataloader_num_workers=t.dataloader_num_workers,
        use_cpu=not on_cuda,
        max_length=t.max_length,
        completion_only_loss=True,
        report_to=tracking.report_to(recipe, run),
        disable_tqdm=not on_terminal(),  # a log file gets StepLines instead
        run_name=recipe.tracking.run_name or run.name,
    )


def write_label_distribution(run: Path, data_dir: Path, labels: list[str], level: str) -> None:
    """RUN_DIR/label_distribution.json: what labeling reports compare their label shares with (the
    whole training split, whatever share of it ``data.max_train_samples`` let this run see)."""
    counts = read_split(data_dir / "train.parquet", labels, level)[level].value_counts()
    (run / "label_distribution.json").write_text(json.dumps(
        {"level": level, "rows": int(counts.sum()), "counts": {label: int(counts.get(label, 0)) for label in labels}},
        indent=1) + "\n")


def write_loss_log(history: list[dict[str, Any]], run: Path) -> None:
    (run / "train_log.json").write_text(json.dumps(history, indent=1) + "\n")
    points = [(h["step"], h["loss"]) for h in history if "loss" in h]
    if not points:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*points))
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (completion tokens)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run / "loss.png", dpi=110)
    plt.close(fig)


def train(recipe: Recipe, run_dir: str | Path, evaluate_after: bool = True,
          callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    """Train (or resume) the run in RUN_DIR; ``callbacks`` (benchmarks) join the trainer's own."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    # config.yaml records the shop's column names DATA_DIR was prepared with (labeling reads by
    # them), and the path this node trains on (labeling merges into the base the adapter knew).
    device = train_device()
    recipe = dataclasses.replace(recipe, data=adopt_prepared_columns(recipe.data),
                                 model=training_path(recipe.model, device))
    check_resumable(run, recipe, device)
    # Under accelerate/torchrun there is one process per device: the main one writes shared files.
    state = PartialState()
    with state.main_process_first():
        if state.is_main_process:
            save_recipe(recipe, run / "config.yaml")
        data_dir = ensure_prepared(recipe)
        base_path = resolve_base_model(recipe.model.base_model)
    set_seed(recipe.train.seed)

    # Data
    level = recipe.data.label_level
    labels = level_labels(data_dir, level)
    frame = read_split(data_dir / "train.parquet", labels, level)
    if recipe.data.max_train_samples:
        frame = frame.head(recipe.data.max_train_samples)
    tokenizer = load_tokenizer(base_path, recipe.model)
    texts = completion_texts(tokenizer, labels, recipe.data.completion)
    dataset = Dataset.from_dict(to_prompt_completion(frame, level, dict(zip(labels, texts))))

    # Model
    model = load_base_model(base_path, recipe.model, device, quantize=True,
                            attn_implementation=recipe.model.attn_implementation)
    fit_embeddings(model, tokenizer)
    model.config.use_cache = False
    if getattr(model, "is_loaded_in_4bit", False):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=recipe.train.gradient_checkpointing
        )

    # Train, resuming from the last checkpoint of an interrupted run
    if recipe.train.completion_only_logits:
        project_labelled_positions_only()
    (run / STOP_FILE).unlink(missing_ok=True)
    stopper = CheckpointAndStop(run / STOP_FILE)
    trainer_class, objective = SFTTrainer, {}
    if recipe.train.objective == "label_softmax":
        trainer_class, objective = LabelSoftmaxTrainer, {"label_ids": first_token_ids(tokenizer, texts),
                                                         "label_smoothing": recipe.train.label_smoothing}
    elif recipe.train.objective != "lm":
        raise ConfigError(f"train.objective={recipe.train.objective!r}: one of {', '.join(OBJECTIVES)}")
    trainer = trainer_class(
        model=model,
        args=sft_config(recipe, run, device),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_lora_config(recipe.lora, model),
        callbacks=[stopper, NoPickledArguments(), *([] if on_terminal() else [StepLines()]), *(callbacks or [])],
        **objective,
    )
    stopper.trainer = trainer
    curve = validation_curve(recipe, data_dir, labels, run)
    if curve is not None:
        trainer.add_callback(curve)
    compute_dtype = resolve_compute_dtype(recipe.model.bnb_4bit_compute_dtype, device)
    trained_dtype = adapter_dtype(recipe.lora.dtype, compute_dtype, trainer.args.fp16)
    cast_trainable_parameters(trainer.model, trained_dtype)
    checkpoints = run / "checkpoints"
    last = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    start = time.perf_counter()
    finished = last and final_state(last, recipe)
    if finished:
        # A job requeued after its last step (the signal came too late to matter) reruns here;
        # resuming at max_steps would train one step past it (transformers runs a step first).
        log.info("%s already reached the final step: saving and evaluating it", last)
        set_peft_model_state_dict(trainer.model, load_file(Path(last) / "adapter_model.safetensors"))
        trainer.state = finished
        stopper.restore_signals()
        result = TrainOutput(trainer.state.global_step, 0.0, {})
    else:
        if last:
            log.info("resuming from %s", last)
            if curve is not None:
                curve.resume(_step_of(last))
        result = trainer.train(resume_from_checkpoint=last)
    wall = time.perf_counter() - start
    if stopper.requested:
        (run / STOP_FILE).unlink(missing_ok=True)  # tells the launcher that the checkpoint is written
    if stopper.requested and trainer.state.global_step < trainer.state.max_steps:
        raise TrainingInterrupted(f"stopped at step {trainer.state.global_step} of {trainer.state.max_steps} "
                                  f"after a checkpoint; rerun to resume")

    # Save
    if not trainer.is_world_process_zero():
        return {}
    (run / "labels.json").write_text(json.dumps(labels, indent=1) + "\n")  # the level the model predicts
    write_label_distribution(run, data_dir, labels, level)
    if (data_dir / "taxonomy.json").is_file():
        shutil.copyfile(data_dir / "taxonomy.json", run / "taxonomy.json")
    trainer.model.save_pretrained(run / "adapter")
    tokenizer.save_pretrained(run / "adapter")
    shared_mode(run / "adapter" / "adapter_model.safetensors")
    write_loss_log(trainer.state.log_history, run)
    steps = trainer.state.global_step
    metrics = {
        "train_runtime_s": round(result.metrics.get("train_runtime", wall), 2),
        "train_steps": steps,
        "examples_per_step": examples_per_step(trainer.args),
        "train_samples": steps * examples_per_step(trainer.args),
        "train_loss": result.metrics.get("train_loss"),
        "resumed_from": last,
        "seconds_per_step_this_session": round(wall / max(1, steps - _step_of(last)), 3),
        "quantization": recipe.model.quantization,
        "compute_dtype": str(compute_dtype) if recipe.model.quantization == "4bit" else None,
        "base_dtype": recipe.model.torch_dtype if recipe.model.quantization == "none" else None,
        "attn_implementation": recipe.model.attn_implementation,
        "adapter_dtype": str(trained_dtype),
        "device": device,
        "torch_threads": torch.get_num_threads(),
    }
    (run / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    del trainer, model

    if evaluate_after:
        from pipeline import calibrate
        from pipeline.evaluate import evaluate

        has_validation = len(read_split(data_dir / "validation.parquet")) > 0
        if has_validation:
            calibrate.fit(run, recipe)
        else:
            log.warning("%s has no rows (data.validation_size=0): no calibration, validation not scored",
                        data_dir / "validation.parquet")
        for split in recipe.eval.splits:
            if split != "validation" or has_validation:
                metrics = evaluate(run, data_dir / f"{split}.parquet", recipe)
    tracking.log_final_metrics(metrics, recipe)
    return metrics


def validation_curve(recipe: Recipe, data_dir: Path, labels: list[str], run: Path) -> AccuracyCurve | None:
    """The curve ``train.curve_every`` asks for, on the first ``train.curve_samples`` validation
    rows (a choice made during training is made on validation, never test); None without one."""
    if not recipe.train.curve_every:
        if recipe.train.stop_at is not None:
            raise ConfigError("train.stop_at needs a validation curve: set train.curve_every")
        return None
    level = recipe.data.label_level
    rows = read_split(data_dir / "validation.parquet", labels, level).head(recipe.train.curve_samples)
    if rows.empty:
        raise ConfigError(f"train.curve_every: {data_dir / 'validation.parquet'} has no rows (data.validation_size=0)")
    return AccuracyCurve(rows["product_name"].tolist(), rows[level].tolist(), labels, recipe.train.curve_every,
                         None, recipe.eval.batch_size, recipe.train.stop_at, recipe.data.completion,
                         path=run / "curve.json")


def final_state(checkpoint: str, recipe: Recipe) -> TrainerState | None:
    """The checkpoint's trainer state if it already reached the recipe's final step, else None."""
    state = TrainerState.load_from_json(str(Path(checkpoint) / TRAINER_STATE_NAME))
    target = recipe.train.max_steps if recipe.train.max_steps > 0 else state.max_steps
    return state if state.global_step >= target else None


def _step_of(checkpoint: str | None) -> int:
    return int(checkpoint.rsplit("-", 1)[-1]) if checkpoint else 0

