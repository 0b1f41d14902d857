"""train.objective=label_softmax: the loss is the label set's cross-entropy at the answer position,
its gradient reaches the adapter only, and a run trained with it is scored like any other."""

import json

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.objective import IGNORED, first_token_ids, label_softmax_loss
from pipeline.passes import label_token_ids
from pipeline.scoring import encode_prompts

LABELS = ["bakery", "frozen", "produce", "dairy eggs"]
ROWS = [("Bread Rolls", "bakery"), ("Frozen Peas", "frozen"), ("Organic Bananas and Apples", "produce")]


def batch(tokenizer) -> dict[str, torch.Tensor]:
    """Prompt + completion, right-padded, the loss masked off the prompt: as trl collates them."""
    prompts, _ = encode_prompts(tokenizer, [name for name, _ in ROWS])
    completions = label_token_ids(tokenizer, [label for _, label in ROWS])
    rows = [p + c for p, c in zip(prompts, completions)]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), IGNORED)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        labels[i, len(p): len(p) + len(c)] = torch.tensor(c)
        mask[i, : len(p) + len(c)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture()
def adapted(base_model):
    from peft import LoraConfig, get_peft_model

    trainable = {name: p.requires_grad for name, p in base_model.named_parameters()}
    torch.manual_seed(0)
    model = get_peft_model(base_model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  init_lora_weights=False))
    yield model
    model.unload()  # the session's base model, as it was: without the adapter, and trainable again
    for name, p in base_model.named_parameters():
        p.requires_grad_(trainable[name])


def test_the_loss_is_the_label_sets_cross_entropy_and_trains_the_adapter_only(adapted, tokenizer):
    inputs = batch(tokenizer)
    label_ids = first_token_ids(tokenizer, LABELS)
    loss = label_softmax_loss(adapted, inputs, label_ids, label_smoothing=0.1)

    with torch.no_grad():  # by hand: the full model's logits where each completion starts
        logits = adapted(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    expected = 0.0
    for i, (_, label) in enumerate(ROWS):
        start = int((inputs["labels"][i] != IGNORED).nonzero()[0])
        log_p = logits[i, start - 1, label_ids].float().log_softmax(-1)
        target = LABELS.index(label)
        expected += -(0.9 * log_p[target] + 0.1 * log_p.mean())  # smoothing spreads 0.1 over all labels
    assert float(loss) == pytest.approx(float(expected) / len(ROWS), rel=1e-4)

    loss.backward()
    grads = {n: p.grad for n, p in adapted.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads.values())
    adapted.zero_grad()


def test_label_sets_sharing_first_tokens_are_refused(tokenizer):
    with pytest.raises(ConfigError, match="distinct_first"):
        first_token_ids(tokenizer, ["fresh fruits", "fresh vegetables"])


@pytest.mark.slow
def test_a_run_trained_on_the_label_softmax_evaluates_like_any_other(tmp_path, data_dir, short_model):
    from pipeline.config import load_recipe
    from pipeline.evaluate import evaluate
    from pipeline.train import train

    recipe = load_recipe("jobs/recipes/instacart-smollm2.yaml", [
        f"data.dir={data_dir}", f"model.base_model={short_model}", "data.max_train_samples=64",
        "train.max_steps=4", "train.per_device_train_batch_size=16", "train.logging_steps=1",
        "train.objective=label_softmax", "train.label_smoothing=0.1", "eval.max_samples=32", "eval.blend=false"])
    train(recipe, tmp_path / "run", evaluate_after=False)
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    losses = [h["loss"] for h in log if "loss" in h]
    assert len(losses) == 4 and all(0 < loss < float("inf") for loss in losses)
    metrics = evaluate(tmp_path / "run", data_dir / "validation.parquet", recipe, progress=False)
    assert metrics["validation"]["n_eval"] == 32 and metrics["validation"]["scorer"] == "first_token"
