"""What every label scorer shares (``pipeline.scoring``'s and ``pipeline.trie``'s) and training's
label objective: the labels' completion tokens as training saw them, prompts batched by length
and left-padded, and the LM head applied to a few tokens only.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import PreTrainedTokenizerBase

from pipeline.data import format_completion, format_prompt
from pipeline.errors import ModelError


def label_token_ids(tokenizer: PreTrainedTokenizerBase, labels: list[str], eos: bool = True) -> list[list[int]]:
    """The completion tokens of each label exactly as training saw them (after a prompt).

    Tokenized in context, since ``" bakery"`` alone and after ``"->:"`` may split differently.
    """
    prompt = format_prompt("x")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    sequences = []
    for label in labels:
        ids = tokenizer(prompt + format_completion(label), add_special_tokens=False)["input_ids"]
        if ids[: len(prompt_ids)] != prompt_ids:
            raise ModelError(f"label {label!r} merges with the prompt's last token; cannot score it")
        completion = ids[len(prompt_ids):]
        sequences.append(completion + ([tokenizer.eos_token_id] if eos else []))
    return sequences


def batches_by_length(lengths: list[int], batch_size: int) -> Iterable[list[int]]:
    """Indices in batches of ``batch_size``, shortest first: a batch's rows need little padding."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def pad_left(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad so the last prompt token sits in the last column, with true position ids."""
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(row)
        attention[i, width - len(row):] = 1
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    return input_ids.to(device), attention.to(device), positions.to(device)


def head_logits(model, hidden: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The LM head's logits for ``hidden`` states: for ``token_ids`` only, or the whole vocabulary.

    The first-token scorer needs the labels' first tokens only: the full-vocabulary head was 14%
    of a batch's time (results/README.md). The logit scaling and soft-capping some models apply
    (Cohere's ``logit_scale``, Gemma 2's ``final_logit_softcapping``) are element-wise, so they
    apply to the selected tokens alike.
    """
    head = model.get_output_embeddings()
    if type(head) is torch.nn.Linear:
        weight = head.weight if token_ids is None else head.weight[token_ids]
        bias = None if head.bias is None else (head.bias if token_ids is None else head.bias[token_ids])
        if token_ids is not None:  # a few rows: in fp32, so that bf16 rounding makes no ties among labels
            hidden, weight, bias = hidden.float(), weight.float(), None if bias is None else bias.float()
        logits = torch.nn.functional.linear(hidden, weight, bias)
    else:  # e.g. an LM head with its own adapter, during training: its forward adds the adapter's part
        logits = head(hidden) if token_ids is None else head(hidden)[..., token_ids]
    config = model.config.get_text_config()
    if getattr(config, "logit_scale", None):
        logits = logits * config.logit_scale
    if getattr(config, "final_logit_softcapping", None):
        logits = torch.tanh(logits / config.final_logit_softcapping) * config.final_logit_softcapping
    return logits
