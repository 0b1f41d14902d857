"""Training benchmarks: a recipe for a fixed budget with its accuracy curve, and where a step's time goes."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from transformers import TrainerCallback

from pipeline.bench.label import MATMUL_OPERATORS
from pipeline.bench.machine import command_line, machine
from pipeline.curve import AccuracyCurve, first_reaching

log = logging.getLogger(__name__)


def bench_train(config: str, overrides: list[str], run: Path, minutes: float | None, eval_every: int,
                eval_samples: int, final_eval: bool, thresholds: list[float],
                stop_at: float | None = None) -> dict[str, Any]:
    from pipeline.config import load_recipe
    from pipeline.data import level_labels, read_split
    from pipeline.train import ensure_prepared, train

    if run.exists():
        raise SystemExit(f"{run}: exists; a benchmark trains a fresh run (choose another --run)")
    recipe = load_recipe(config, overrides)
    data_dir = ensure_prepared(recipe)
    level = recipe.data.label_level
    labels = level_labels(data_dir, level)
    # The curve (and --stop-at) is a choice made during training: validation, never test, where there is one.
    curve_split, held_out = "validation", read_split(data_dir / "validation.parquet", labels, level)
    if held_out.empty:
        curve_split, held_out = "test", read_split(data_dir / "test.parquet", labels, level)
    held_out = held_out.head(eval_samples)
    curve = AccuracyCurve(held_out["product_name"].tolist(), held_out[level].tolist(), labels, eval_every,
                          minutes * 60 if minutes else None, recipe.eval.batch_size, stop_at, recipe.data.completion)
    started = time.time()
    metrics = train(recipe, run, evaluate_after=final_eval, callbacks=[curve])

    examples_per_step = metrics["examples_per_step"]
    timed = curve.step_seconds[2:] or curve.step_seconds  # the first steps warm up allocators and caches
    seconds_per_step = float(pd.Series(timed).median())
    history = json.loads((run / "train_log.json").read_text())
    tokens = max((h.get("num_tokens", 0) for h in history), default=0)
    # "department": for a run below the department level, the department its labels imply
    final_keys = ("label_level", "predictor", "scorer", "accuracy", "macro_f1", "n_eval", "adapter", "baseline",
                  "versus_baseline", "majority_class", "per_label", "department", "eval_products_per_s")
    splits = [split for split in recipe.eval.splits if isinstance(metrics.get(split), dict)]
    return {
        "benchmark": "train",
        "command": command_line(),
        "recipe": config,
        "overrides": overrides,
        "config": recipe.to_dict(),
        "run": str(run),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "machine": machine(metrics.get("device")),
        "training_path": {k: metrics.get(k) for k in TRAINING_PATH_KEYS},
        "steps": metrics["train_steps"],
        "throughput": {
            "steps_timed": len(timed),
            "seconds_per_step": round(seconds_per_step, 3),
            "examples_per_s": round(examples_per_step / seconds_per_step, 2),
            "tokens_per_s": round(tokens / curve.train_seconds, 1) if tokens else None,
            "tokens_per_example": round(tokens / (metrics["train_steps"] * examples_per_step), 1) if tokens else None,
        },
        "train_seconds": round(curve.train_seconds, 1),
        "curve_split": curve_split,
        "eval_samples": len(held_out),
        "curve": curve.points,
        "time_to_accuracy": {str(a): first_reaching(curve.points, a) for a in thresholds},
        "final": {split: {k: metrics[split][k] for k in final_keys if k in metrics[split]} for split in splits},
    }


TRAINING_PATH_KEYS = ("quantization", "compute_dtype", "base_dtype", "attn_implementation", "adapter_dtype")
"""What a run's metrics.json says about the path ``pipeline.model.training_path`` chose."""

DEQUANTIZE_MARKS = ("dequantize",)
"""What names bitsandbytes' dequantization in a profile: ``bitsandbytes::dequantize_4bit`` (the NF4
weights) and ``bitsandbytes::dequantize_blockwise`` (their double-quantized scales)."""

BNB_4BIT_MARKS = ("bitsandbytes", "gemv_4bit", "matmul4bit")
"""What names all of the 4-bit layers' work: bitsandbytes' ops and its ``MatMul4Bit`` autograd function
forward and backward. On CPU, ``bitsandbytes::gemm_4bit`` dequantizes and then multiplies, so this
includes the base layers' matrix products as well as the dequantization."""

STEP_PHASES = ("data", "forward", "backward", "clip", "optimizer", "other")
"""How :class:`TrainStepTimer` splits an optimizer step: fetching and collating the batch (with the
previous step's logging), ``compute_loss`` (forward pass, loss and trl's token metrics), the backward
pass, gradient clipping, ``optimizer.step()``, and the rest (scheduler, ``zero_grad``, callbacks)."""


def padding_share(real_tokens: int, total_tokens: int) -> float:
    """Padded positions over all positions of the batches (0 when there are none)."""
    return round(1 - real_tokens / total_tokens, 4) if total_tokens else 0.0


def batches_padding_share(lengths: list[int], order: list[int], batch_size: int) -> float:
    """The padding share of batches of ``batch_size`` taken from ``order`` (indices into ``lengths``),
    each padded to its longest example, as trl's collator pads."""
    real = total = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start:start + batch_size]]
        real += sum(batch)
        total += max(batch) * len(batch)
    return padding_share(real, total)


def top_level_time_us(events, marks: tuple[str, ...]) -> tuple[float, int]:
    """Total CPU time (children included) and count of the profiled events whose name holds one of
    ``marks`` (case-insensitive), counting an event nested in another such event once."""
    def matches(event) -> bool:
        return any(mark in event.name.lower() for mark in marks)

    total, count = 0.0, 0
    for event in events:
        if not matches(event):
            continue
        parent = event.cpu_parent
        while parent is not None and not matches(parent):
            parent = parent.cpu_parent
        if parent is None:
            total += event.cpu_time_total
            count += 1
    return total, count


class TrainStepTimer(TrainerCallback):
    """Times each optimizer step and its :data:`STEP_PHASES` (``perf_counter``, a step running from
    the previous step's end to its own), counts the real and padded tokens of its batch, and runs
    torch.profiler over the last ``profiled`` steps, after ``warmup`` untimed and ``timed``
    unprofiled ones.

    ``compute_loss`` and the backward pass are timed by :func:`profiled_trainer_class`'s trainer;
    the optimizer step between the trainer's own ``on_pre_optimizer_step`` and ``on_optimizer_step``."""

    def __init__(self, warmup: int, timed: int, profiled: int) -> None:
        self.warmup, self.timed, self.profiled = warmup, timed, profiled
        self.steps: list[dict[str, Any]] = []
        self.current: dict[str, float] = {}
        self.trainer = None
        self.profiler = None
        self.profiled_seconds = 0.0
        self.last_end = self.mark = 0.0

    def add(self, phase: str, seconds: float) -> None:
        self.current[phase] = self.current.get(phase, 0.0) + seconds

    def batch(self, attention_mask: torch.Tensor) -> None:
        self.add("real_tokens", int(attention_mask.sum()))
        self.add("tokens", attention_mask.numel())
        self.add("examples", attention_mask.shape[0])

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_end = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self.add("data", time.perf_counter() - self.last_end)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.mark = time.perf_counter()
        self.add("clip", self.mark - self.current.pop("backward_end", self.mark))

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.add("optimizer", time.perf_counter() - self.mark)

    def on_step_end(self, args, state, control, **kwargs):
        from torch.profiler import ProfilerActivity, profile

        now = time.perf_counter()
        seconds = now - self.last_end
        step = state.global_step
        first_profiled = self.warmup + self.timed + 1
        record = {"step": step, "kind": "warmup" if step <= self.warmup else "timed" if step < first_profiled
                  else "profiled", "seconds": round(seconds, 4)}
        phases = {p: self.current.get(p, 0.0) for p in STEP_PHASES[:-1]}
        phases["other"] = seconds - sum(phases.values())
        record.update({f"{p}_s": round(v, 4) for p, v in phases.items()})
        record.update({k: int(self.current.get(k, 0)) for k in ("examples", "real_tokens", "tokens")})
        self.steps.append(record)
        self.current = {}
        if record["kind"] == "profiled":
            self.profiled_seconds += seconds
        if step == first_profiled - 1:
            self.profiler = profile(activities=[ProfilerActivity.CPU], record_shapes=False)
            self.profiler.start()
        elif step == first_profiled + self.profiled - 1 and self.profiler is not None:
            self.profiler.stop()
        self.last_end = time.perf_counter()
        return control


def profiled_trainer_class(timer: TrainStepTimer):
    """trl's SFTTrainer with its ``compute_loss`` and backward pass timed into ``timer`` and marked as
    ``train_step/forward`` and ``train_step/backward`` ranges in the profile; nothing else changes."""
    from torch.profiler import record_function
    from trl import SFTTrainer

    class ProfiledSFTTrainer(SFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            timer.trainer = self
            backward = self.accelerator.backward

            def timed_backward(loss, **kw):
                start = time.perf_counter()
                with record_function("train_step/backward"):
                    backward(loss, **kw)
                timer.current["backward_end"] = time.perf_counter()
                timer.add("backward", timer.current["backward_end"] - start)

            self.accelerator.backward = timed_backward

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.model.training and inputs.get("attention_mask") is not None:
                timer.batch(inputs["attention_mask"])
            start = time.perf_counter()
            with record_function("train_step/forward"):
                result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            timer.add("forward", time.perf_counter() - start)
            return result

    return ProfiledSFTTrainer


def bench_profile_train(config: str, overrides: list[str], warmup: int, timed: int, profiled: int,
                        top: int) -> dict[str, Any]:
    """A few steps of a recipe trained as ``pipeline.train.train`` trains it (its trainer, with the
    ``compute_loss`` and backward pass timed): the step time and its phases outside the profiler
    and under it, torch.profiler's operators by self CPU time, the time in bitsandbytes' 4-bit
    dequantization, and the padding share of the batches (and of a whole epoch in the sampler's order)."""
    from unittest import mock

    import pipeline.train as train_module
    from pipeline.config import load_recipe

    steps = warmup + timed + profiled
    forced = [f"train.max_steps={steps}", f"train.save_steps={steps + 1}", f"train.logging_steps={steps + 1}"]
    recipe = load_recipe(config, [*overrides, *forced])
    if recipe.train.objective != "lm":
        raise SystemExit(f"train.objective={recipe.train.objective}: profile-train times trl's SFTTrainer (lm only)")
    timer = TrainStepTimer(warmup, timed, profiled)
    load_before = os.getloadavg()  # other processes on the cores slow every step (2-core VMs are shared)
    with tempfile.TemporaryDirectory() as run, mock.patch.object(train_module, "SFTTrainer",
                                                                  profiled_trainer_class(timer)):
        metrics = train_module.train(recipe, Path(run) / "run", evaluate_after=False, callbacks=[timer])
    load_after = os.getloadavg()
    prof, trainer = timer.profiler, timer.trainer

    def summary(kind: str) -> dict[str, Any]:
        """Median step time; phase shares and padding over the steps within 1.5x the median (on a
        shared 2-core VM another process's burst made single steps 10-30x slower)."""
        rows = [s for s in timer.steps if s["kind"] == kind]
        median = float(pd.Series([s["seconds"] for s in rows]).median())
        rows = [s for s in rows if s["seconds"] <= 1.5 * median]
        seconds = sum(s["seconds"] for s in rows)
        return {"steps": len([s for s in timer.steps if s["kind"] == kind]), "steps_kept": len(rows),
                "seconds_per_step_median": round(median, 3),
                "phase_shares": {p: round(sum(s[f"{p}_s"] for s in rows) / seconds, 4) for p in STEP_PHASES},
                "phase_seconds_per_step": {p: round(sum(s[f"{p}_s"] for s in rows) / len(rows), 4)
                                           for p in STEP_PHASES},
                "padding_share": padding_share(sum(s["real_tokens"] for s in rows), sum(s["tokens"] for s in rows)),
                "real_tokens_per_example": round(sum(s["real_tokens"] for s in rows)
                                                 / sum(s["examples"] for s in rows), 2),
                "padded_length_mean": round(sum(s["tokens"] for s in rows) / sum(s["examples"] for s in rows), 2)}

    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    operator_us = sum(e.self_cpu_time_total for e in events)
    wall_us = timer.profiled_seconds * 1e6
    function_events = prof.events()
    dequantize_us, dequantize_calls = top_level_time_us(function_events, DEQUANTIZE_MARKS)
    bnb_us, bnb_calls = top_level_time_us(function_events, BNB_4BIT_MARKS)
    ranges = {e.key: e for e in prof.key_averages()
              if e.key.startswith("train_step/") or e.key.startswith("Optimizer.step#")}

    # The whole epoch's padding in the order the trainer's sampler gives, and in a random order.
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    batch = trainer.args.per_device_train_batch_size
    generator = torch.Generator().manual_seed(0)
    epoch = {"examples": len(lengths), "mean_length": round(sum(lengths) / len(lengths), 2),
             "sampler": trainer.args.train_sampling_strategy,
             "padding_share_sampler_order": batches_padding_share(lengths, list(trainer._get_train_sampler()), batch),
             "padding_share_random_order": batches_padding_share(
                 lengths, torch.randperm(len(lengths), generator=generator).tolist(), batch)}
    return {
        "benchmark": "profile-train",
        "command": command_line(),
        "recipe": config,
        "overrides": overrides,
        "config": recipe.to_dict(),
        "machine": machine(metrics.get("device")),
        "load_average_1min": {"before": round(load_before[0], 2), "after_training": round(load_after[0], 2)},
        "training_path": {k: metrics.get(k) for k in TRAINING_PATH_KEYS},
        "batch_size": batch,
        "steps": {"warmup": warmup, "timed": timed, "profiled": profiled},
        "unprofiled": summary("timed"),
        "profiled": summary("profiled"),
        "padding_epoch": epoch,
        "profile": {
            "seconds": round(timer.profiled_seconds, 3),
            "operator_self_ms": round(operator_us / 1e3, 1),
            "operator_share_of_wall": round(operator_us / wall_us, 4),
            "matmul_share": round(sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPERATORS)
                                  / operator_us, 4),
            "dropout_share_of_wall": round(sum(e.self_cpu_time_total for e in events if "bernoulli" in e.key
                                               or "dropout" in e.key) / wall_us, 4),  # LoRA's, drawn on CPU
            "bnb_4bit": {
                "dequantize_ms": round(dequantize_us / 1e3, 1), "dequantize_calls": dequantize_calls,
                "dequantize_share_of_wall": round(dequantize_us / wall_us, 4),
                "all_4bit_ms": round(bnb_us / 1e3, 1), "all_4bit_calls": bnb_calls,
                "all_4bit_share_of_wall": round(bnb_us / wall_us, 4),
                "operators": [{"operator": e.key, "calls": e.count, "self_ms": round(e.self_cpu_time_total / 1e3, 2),
                               "total_ms": round(e.cpu_time_total / 1e3, 2)}
                              for e in events if any(m in e.key.lower() for m in BNB_4BIT_MARKS)]},
            "ranges": {name: {"calls": e.count, "total_ms": round(e.cpu_time_total / 1e3, 1),
                              "share_of_wall": round(e.cpu_time_total / wall_us, 4)} for name, e in ranges.items()},
            "operators": [{"operator": e.key, "calls": e.count, "self_ms": round(e.self_cpu_time_total / 1e3, 2),
                           "share": round(e.self_cpu_time_total / operator_us, 4),
                           "share_of_wall": round(e.self_cpu_time_total / wall_us, 4)} for e in events[:top]]},
        "step_log": timer.steps,
    }
