"""Integration: a few real NF4 QLoRA steps on the embedded model, resume, evaluate (about 1 min)."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from datasets import Dataset
from safetensors import safe_open
from trl import SFTTrainer

from pipeline.config import ModelConfig, Recipe, load_recipe
from pipeline.data import to_prompt_completion
from pipeline.model import cpu_has_native_bf16, resolve_compute_dtype, training_path
from pipeline.signals import SIGNALS
from pipeline.train import CheckpointAndStop, sft_config, train

REPO = Path(__file__).resolve().parents[1]


def test_loss_is_on_the_completion_and_eos_only(base_model, tokenizer, tmp_path):
    dataset = Dataset.from_dict(to_prompt_completion(pd.DataFrame(
        {"product_name": ["Bread Rolls"], "department": ["bakery"]})))
    trainer = SFTTrainer(model=base_model, args=sft_config(Recipe(), tmp_path, "cpu"), train_dataset=dataset,
                         processing_class=tokenizer)
    example = trainer.train_dataset[0]
    tokens = tokenizer.convert_ids_to_tokens(example["input_ids"])
    assert tokens == ["B", "read", "ĠRolls", "Ġ->", ":", "Ġbakery", "<|im_end|>"]
    masked = [t if label != -100 else None for t, label in zip(tokens, example["labels"])]
    assert masked == [None, None, None, None, None, "Ġbakery", "<|im_end|>"]
    batch = trainer.data_collator([example, trainer.train_dataset[0] | {}])
    assert batch["labels"][0, -1].item() == tokenizer.eos_token_id  # EOS is learnt, not masked as padding


def test_projecting_labelled_positions_only_keeps_loss_and_gradients(base_model, tokenizer, tmp_path, monkeypatch):
    import trl.trainer.utils as trl_utils

    from pipeline.train import project_labelled_positions_only

    monkeypatch.setattr(trl_utils, "_use_triton", trl_utils._use_triton)  # restored after the test
    frame = pd.DataFrame({"product_name": ["Bread Rolls", "Organic Whole Milk", "Dog Food Chicken Recipe", "Ice"],
                          "department": ["bakery", "dairy eggs", "pets", "frozen"]})
    dataset = Dataset.from_dict(to_prompt_completion(frame))
    trainer = SFTTrainer(model=base_model, args=sft_config(Recipe(), tmp_path, "cpu"), train_dataset=dataset,
                         processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])

    def loss_and_gradient():
        base_model.zero_grad()
        loss = trainer.compute_loss(base_model, dict(batch))
        loss.backward()
        return loss.detach(), base_model.model.norm.weight.grad.clone()

    try:
        every_position = loss_and_gradient()
        project_labelled_positions_only()
        labelled_only = loss_and_gradient()
    finally:
        base_model.zero_grad(set_to_none=True)
    assert torch.allclose(every_position[0], labelled_only[0], atol=1e-5)
    assert torch.allclose(every_position[1], labelled_only[1], atol=1e-5, rtol=1e-4)


def test_the_adapter_trains_in_fp32_unless_the_base_computes_in_bf16(short_model, tokenizer, tmp_path):
    """trl keeps a quantized model's adapter in bf16: emulated (steps twice as long) where the base
    computes in fp32, and fp16's gradient scaler cannot unscale it on CUDA (the tutorial recipe
    stopped at its first step on an H200). The frozen base stays packed as it was."""
    from pipeline.config import LoraConfig, ModelConfig
    from pipeline.errors import ModelError
    from pipeline.model import adapter_dtype, load_base_model, peft_lora_config
    from pipeline.train import cast_trainable_parameters

    assert adapter_dtype("auto", torch.float32, fp16=False) == torch.float32
    assert adapter_dtype("auto", torch.bfloat16, fp16=False) == torch.bfloat16
    assert adapter_dtype("auto", torch.float16, fp16=True) == torch.float32
    with pytest.raises(ModelError, match="lora.dtype"):
        adapter_dtype("bfloat16", torch.float16, fp16=True)

    model = load_base_model(short_model, ModelConfig(), "cpu", quantize=True)
    dataset = Dataset.from_dict(to_prompt_completion(pd.DataFrame({"product_name": ["Ice"], "department": ["frozen"]})))
    trainer = SFTTrainer(model=model, args=sft_config(Recipe(), tmp_path, "cpu"), train_dataset=dataset,
                         processing_class=tokenizer, peft_config=peft_lora_config(LoraConfig(), model))
    frozen = {n: p.dtype for n, p in trainer.model.named_parameters() if not p.requires_grad}
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.bfloat16}  # trl's choice
    cast_trainable_parameters(trainer.model, torch.float32)
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.float32}
    assert {n: p.dtype for n, p in trainer.model.named_parameters() if not p.requires_grad} == frozen
    assert any(type(p).__name__ == "Params4bit" for p in trainer.model.parameters())  # still NF4-packed


def test_top_layers_adapts_only_the_last_layers_and_backward_stops_below_them(short_model, tokenizer, tmp_path):
    """lora.top_layers=1 on the two-layer model: adapters in layer 1 only, and a backward pass
    leaves layer 0's activations without gradients (what makes such a step cheaper)."""
    from peft import get_peft_model

    from pipeline.config import LoraConfig, ModelConfig
    from pipeline.errors import ConfigError
    from pipeline.model import load_base_model, peft_lora_config

    model = load_base_model(short_model, ModelConfig(quantization="none"), "cpu", quantize=False)
    peft_model = get_peft_model(model, peft_lora_config(LoraConfig(top_layers=1), model))
    adapted = {int(n.split(".layers.")[1].split(".")[0]) for n, p in peft_model.named_parameters() if p.requires_grad}
    assert adapted == {1}
    reached = []
    decoder = peft_model.get_base_model().model
    for layer in decoder.layers:
        layer.register_forward_hook(lambda _m, _i, out: reached.append(
            (out[0] if isinstance(out, tuple) else out).requires_grad))
    batch = tokenizer(["Bread Rolls ->: bakery"], return_tensors="pt")
    peft_model(**batch, labels=batch["input_ids"]).loss.backward()
    assert reached == [False, True]  # layer 0's output needs no gradient: autograd never enters it
    with pytest.raises(ConfigError, match="lora.top_layers=3: the base model has 2 decoder layers"):
        peft_lora_config(LoraConfig(top_layers=3), model)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir, base_model_path):
    """4 NF4 steps on a 200-example train set, checkpoint and validation curve every 2 steps."""
    run = tmp_path_factory.mktemp("run")
    recipe = load_recipe(REPO / "jobs" / "recipes" / "instacart-smollm2.yaml", [
        f"data.dir={data_dir}", "data.max_train_samples=200", "train.max_steps=4", "train.save_steps=2",
        "train.per_device_train_batch_size=8", "train.logging_steps=1", "eval.max_samples=48",
        "model.quantization=4bit", "train.curve_every=2", "train.curve_samples=24",
    ])
    metrics = train(recipe, run)
    return run, recipe, metrics


def test_auto_compute_dtype_is_bf16_only_where_the_hardware_multiplies_it():
    avx512_only = {"avx2", "avx512f", "avx512_vnni"}
    assert resolve_compute_dtype("auto", "cpu", avx512_only) == torch.float32
    assert resolve_compute_dtype("auto", "cuda:0", avx512_only) == torch.bfloat16
    assert resolve_compute_dtype("bfloat16", "cpu", avx512_only) == torch.bfloat16
    assert resolve_compute_dtype("auto", "cpu", avx512_only | {"amx_tile", "amx_bf16"}) == torch.bfloat16
    assert resolve_compute_dtype("auto", "cpu", avx512_only | {"avx512_bf16"}) == torch.bfloat16
    assert resolve_compute_dtype("float16", "cpu", avx512_only) == torch.float16


def test_the_training_path_is_qlora_on_a_gpu_and_plain_lora_on_a_cpu_in_the_dtype_it_multiplies():
    amx, avx2 = {"avx2", "avx512f", "amx_tile", "amx_bf16"}, {"avx2"}
    auto = ModelConfig(quantization="auto")
    path = {device: training_path(auto, device, flags) for device, flags in
            (("cuda:0", avx2), ("cpu-amx", amx), ("cpu-avx2", avx2))}
    assert (path["cuda:0"].quantization, path["cuda:0"].bnb_4bit_compute_dtype) == ("4bit", "bfloat16")
    assert path["cuda:0"].attn_implementation == "sdpa"
    assert (path["cpu-amx"].quantization, path["cpu-amx"].torch_dtype) == ("none", "bfloat16")
    assert path["cpu-amx"].attn_implementation == "eager"  # SDPA's bf16 backward is slow on CPU
    assert (path["cpu-avx2"].quantization, path["cpu-avx2"].torch_dtype) == ("none", "float32")
    assert path["cpu-avx2"].attn_implementation == "sdpa"
    # what a recipe names is kept, and what config.yaml records resolves to itself on any node
    named = ModelConfig(quantization="4bit", attn_implementation="sdpa")
    assert (training_path(named, "cpu", amx).quantization, training_path(named, "cpu", amx).attn_implementation) \
        == ("4bit", "sdpa")
    assert training_path(path["cpu-amx"], "cuda:0", avx2) == path["cpu-amx"]
    with pytest.raises(ValueError, match="model.quantization must be 4bit, none or auto, got '8bit'"):
        training_path(ModelConfig(quantization="8bit"), "cpu", amx)


def test_run_directory_matches_the_contract(tiny_run):
    run, _, metrics = tiny_run
    assert metrics["train_steps"] == 4 and metrics["train_samples"] == 32 and metrics["train_runtime_s"] > 0
    for split in ("validation", "test"):  # one block per split, each beside the baseline on its own rows
        block = metrics[split]
        assert block["n_eval"] == 48 and 0 <= block["accuracy"] <= 1 and 0 <= block["macro_f1"] <= 1
        assert block["eval_data"].endswith(f"{split}.parquet") and "accuracy" in block["baseline"]
        assert len(pd.read_parquet(run / f"predictions_{split}.parquet")) == 48
        assert (run / f"confusion_matrix_{split}.png").stat().st_size > 0
    validation_ids = set(pd.read_parquet(run / "predictions_validation.parquet")["product_id"])
    assert validation_ids.isdisjoint(pd.read_parquet(run / "predictions_test.parquet")["product_id"])
    assert json.loads((run / "metrics.json").read_text()) == metrics
    assert len(json.loads((run / "labels.json").read_text())) == 20
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 16
    with safe_open(run / "adapter" / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
        dtypes = {f.get_tensor(k).dtype for k in keys}
    assert keys and all("lora_" in k for k in keys)
    trained_in = torch.bfloat16 if cpu_has_native_bf16() else torch.float32  # the base's compute dtype (auto)
    assert dtypes == {trained_in} and metrics["adapter_dtype"] == str(trained_in)
    assert load_recipe(run / "config.yaml").train.max_steps == 4
    assert (run / "loss.png").stat().st_size > 0
    assert [h["step"] for h in json.loads((run / "train_log.json").read_text()) if "loss" in h] == [1, 2, 3, 4]
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir()) == ["checkpoint-2", "checkpoint-4"]
    base = metrics["test"]["majority_class"]
    assert base["label"] == "personal care" and 0 < base["accuracy"] < 1
    curve = json.loads((run / "curve.json").read_text())
    assert curve["split"] == "validation" and curve["samples"] == 24 and [p["step"] for p in curve["points"]] == [2, 4]
    assert all(0 <= p["accuracy"] <= 1 for p in curve["points"])


def test_rerun_resumes_from_the_last_checkpoint(tiny_run):
    run, recipe, _ = tiny_run
    recipe.train.max_steps = 6
    handlers = [signal.getsignal(sig) for sig in SIGNALS]
    metrics = train(recipe, run, evaluate_after=False)
    assert [signal.getsignal(sig) for sig in SIGNALS] == handlers  # none left behind
    assert metrics["resumed_from"].endswith("checkpoint-4")
    assert metrics["train_steps"] == 6
    steps = [h["step"] for h in json.loads((run / "train_log.json").read_text()) if "loss" in h]
    assert steps == [1, 2, 3, 4, 5, 6]  # the log of the first session is kept, no step is redone
    points = json.loads((run / "curve.json").read_text())["points"]  # and so is its validation curve
    assert [p["step"] for p in points] == [2, 4, 6]
    assert points[0]["train_seconds"] < points[1]["train_seconds"] < points[2]["train_seconds"]


def test_rerun_of_a_finished_run_trains_no_further(tiny_run):
    """A job requeued after its final checkpoint reruns: no step past max_steps, the same adapter."""
    run, recipe, _ = tiny_run
    recipe.train.max_steps = 6
    before = (run / "checkpoints" / "checkpoint-6" / "adapter_model.safetensors").read_bytes()
    handlers = [signal.getsignal(sig) for sig in SIGNALS]
    metrics = train(recipe, run, evaluate_after=False)
    assert [signal.getsignal(sig) for sig in SIGNALS] == handlers
    assert metrics["train_steps"] == 6 and metrics["resumed_from"].endswith("checkpoint-6")
    assert [h["step"] for h in json.loads((run / "train_log.json").read_text()) if "loss" in h] == list(range(1, 7))
    assert sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    with safe_open(run / "adapter" / "adapter_model.safetensors", "pt") as saved, \
            safe_open(run / "checkpoints" / "checkpoint-6" / "adapter_model.safetensors", "pt") as checkpoint:
        for key in checkpoint.keys():  # in the adapter's dtype (lora.dtype)
            weight = saved.get_tensor(key)
            assert weight.equal(checkpoint.get_tensor(key).to(weight.dtype)), key
    assert (run / "checkpoints" / "checkpoint-6" / "adapter_model.safetensors").read_bytes() == before


def test_the_trl_function_the_logits_patch_replaces_is_the_one_it_was_written_for():
    """train.completion_only_logits replaces a private trl function: a trl that changes it must
    be looked at before the patch is trusted again (and the patch turns itself off on another trl)."""
    import hashlib
    import inspect

    import trl
    import trl.trainer.utils as trl_utils
    from trl.kernels import chunked_logprob

    from pipeline.train import PATCHED_TRL

    assert trl.__version__.startswith(PATCHED_TRL)
    # the patch rebinds trl.trainer.utils' name for this function, which decides the compaction there
    source = inspect.getsource(chunked_logprob._use_triton)
    assert hashlib.sha256(source.encode()).hexdigest()[:16] == "f0510984e05ac05c", source
    assert "compact = _use_triton(hidden_states.device)" in inspect.getsource(trl_utils)


def test_a_signal_asks_for_a_checkpoint_during_training_only(tmp_path):
    """Once training has ended nothing would act on the request, so SIGTERM must reach the
    handler that was there before (by default: end the process, for Slurm to requeue)."""
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        stopper = CheckpointAndStop(tmp_path / "STOP")
        os.kill(os.getpid(), signal.SIGTERM)
        assert stopper.requested and seen == []
        stopper.on_train_end(None, None, None)
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_rerun_with_another_recipe_is_refused(tiny_run):
    run, recipe, _ = tiny_run
    other = load_recipe(run / "config.yaml", ["lora.r=8"])
    with pytest.raises(ValueError, match="differs in lora.r"):
        train(other, run)


def test_a_run_saved_before_a_new_training_key_resumes_while_the_key_is_at_its_default(tmp_path):
    import yaml

    from pipeline.train import check_resumable

    recipe = load_recipe(REPO / "jobs" / "recipes" / "instacart-smollm2.yaml")
    saved = recipe.to_dict()
    del saved["lora"]["dtype"]  # a run from before lora.dtype existed
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    check_resumable(tmp_path, recipe, "cpu")
    with pytest.raises(ValueError, match="differs in lora.dtype"):
        check_resumable(tmp_path, load_recipe(REPO / "jobs" / "recipes" / "instacart-smollm2.yaml",
                                              ["lora.dtype=bfloat16"]), "cpu")


def test_a_run_resumes_only_on_the_training_path_it_began_on(tmp_path):
    """config.yaml holds the resolved path; ``auto`` resolves again on the node that resumes."""
    import yaml

    from pipeline.train import check_resumable

    recipe = load_recipe(REPO / "jobs" / "recipes" / "instacart-smollm2.yaml", ["model.quantization=auto"])
    on_cpu = dataclasses.replace(recipe, model=training_path(recipe.model, "cpu"))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(on_cpu.to_dict()))
    check_resumable(tmp_path, recipe, "cpu")  # auto resolves to what the run recorded
    with pytest.raises(ValueError, match="differs in model.quantization"):
        check_resumable(tmp_path, recipe, "cuda:0")  # begun as plain LoRA on CPU, QLoRA on a GPU


def test_evaluate_command(tiny_run, data_dir):
    run, _, _ = tiny_run
    result = subprocess.run([sys.executable, "-m", "pipeline", "evaluate", "--run", str(run),
                             "--data", str(data_dir / "test.parquet"), "eval.max_samples=30"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "majority (personal care)" in result.stdout and "precision" in result.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["n_eval"] == 30 and metrics["test"]["scorer"] == "first_token"
    predictions = pd.read_parquet(run / "predictions_test.parquet")
    labels = json.loads((run / "labels.json").read_text())
    assert len(predictions) == 30 and predictions["predicted"].isin(labels).all()
    assert predictions["confidence"].between(0, 1).all()


def test_inference_merges_the_adapter_into_the_base_it_was_trained_on(tiny_run):
    """A QLoRA adapter learned its update against NF4-rounded weights; inference merges it into those."""
    from bitsandbytes.functional import dequantize_4bit
    from safetensors.torch import load_file

    from pipeline.model import InferencePath, load_base_model, load_for_inference, resolve_base_model

    run, recipe, _ = tiny_run
    merged, _ = load_for_inference(run, recipe.model, "cpu", InferencePath(torch.float32))
    path = resolve_base_model(recipe.model.base_model)
    trained_on = load_base_model(path, recipe.model, "cpu", quantize=True).model.layers[0].self_attn.q_proj
    nf4 = dequantize_4bit(trained_on.weight.data, trained_on.weight.quant_state).float()
    original = load_base_model(path, recipe.model, "cpu", quantize=False, dtype=torch.float32)
    assert not torch.allclose(nf4, original.model.layers[0].self_attn.q_proj.weight)
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    update = adapter[f"{prefix}.lora_B.weight"].float() @ adapter[f"{prefix}.lora_A.weight"].float()
    assert update.abs().max() > 0
    expected = nf4 + recipe.lora.alpha / recipe.lora.r * update
    assert torch.allclose(merged.model.layers[0].self_attn.q_proj.weight, expected, atol=1e-6)


def test_evaluate_rejects_a_non_run(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pipeline", "evaluate", "--run", str(tmp_path)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip() == f"catalog-tuner evaluate: error: {tmp_path}: not a run directory (no config.yaml)"


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tmp_path, data_dir, base_model_path):
    """Data parallelism: 2 CPU processes (torchrun, gloo) train one NF4 adapter; rank 0 writes the run."""
    run = tmp_path / "ddp"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "pipeline",
                             "train", "--config", str(REPO / "jobs" / "recipes" / "instacart-smollm2.yaml"),
                             "--output", str(run), f"data.dir={data_dir}", "data.max_train_samples=64",
                             "train.max_steps=2", "train.per_device_train_batch_size=4", "eval.max_samples=16"],
                            capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train_steps"] == 2 and metrics["train_samples"] == 2 * 4 * 2  # both processes' batches
    # stderr is a file here, as in a Slurm job: whole lines, no bar redrawn with carriage returns
    assert "\r" not in result.stderr and "training: step 2/2 (100%)" in result.stderr, result.stderr[-3000:]
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and metrics["test"]["n_eval"] == 16


def test_inference_merges_an_input_embedding_adapter_without_touching_the_tied_lm_head(adapter_run, tmp_path):
    """SmolLM2 ties its LM head to the input embeddings; an adapter on ``embed_tokens`` trains the
    lookup only, so the merged model must give the logits of the unmerged adapter it came from."""
    from peft import LoraConfig, get_peft_model

    from pipeline.config import load_recipe
    from pipeline.model import InferencePath, load_base_model, load_for_inference, resolve_base_model

    run = tmp_path / "run"
    shutil.copytree(adapter_run, run)
    recipe = load_recipe(run / "config.yaml")
    # the base as inference rebuilds it: NF4-rounded for a 4-bit run, the fp32 weights for plain LoRA
    base = load_base_model(resolve_base_model(recipe.model.base_model), recipe.model, "cpu", quantize=True,
                           dtype=torch.float32)
    base = (base.dequantize() if recipe.model.quantization == "4bit" else base).float()
    assert base.get_output_embeddings().weight is base.get_input_embeddings().weight
    trained = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"], init_lora_weights=False))
    shutil.rmtree(run / "adapter")
    trained.save_pretrained(run / "adapter")
    merged, tokenizer = load_for_inference(run, recipe.model, "cpu", InferencePath(torch.float32))
    ids = tokenizer(["Bread Rolls ->:"], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(merged(**ids).logits, trained.eval()(**ids).logits, atol=1e-3)


def test_stop_at_needs_a_validation_curve(data_dir, tmp_path):
    from pipeline.errors import ConfigError
    from pipeline.train import validation_curve

    recipe = load_recipe(REPO / "jobs" / "recipes" / "instacart-smollm2.yaml", ["train.stop_at=0.85"])
    with pytest.raises(ConfigError, match="train.curve_every"):
        validation_curve(recipe, data_dir, json.loads((data_dir / "labels.json").read_text()), tmp_path)
