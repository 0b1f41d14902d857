"""Constrained label scoring: the model picks one label of the label set, with a confidence.

Free generation can answer anything ("Department - breakfast", or a paragraph); scoring the
label set always yields a valid label. Two scorers:

- first-token: when every label's first completion token is distinct (the 21 Instacart
  departments are), one forward pass per product and the logits at the last prompt position
  decide; confidence is the softmax over the labels' first-token logits.
- full: the exact log-likelihood of each whole completion (label tokens + EOS), for label
  sets whose labels share a first token; cost grows with the number of labels.

Both batch prompts sorted by token length (little padding) under ``torch.inference_mode``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from pipeline.data import format_completion, format_prompt


@dataclass
class Scores:
    labels: list[str]
    """Predicted label per input, in input order."""
    confidence: list[float]
    """Softmax probability of the predicted label within the label set."""


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
            raise ValueError(f"label {label!r} merges with the prompt's last token; cannot score it")
        completion = ids[len(prompt_ids):]
        sequences.append(completion + ([tokenizer.eos_token_id] if eos else []))
    return sequences


def first_tokens_distinct(tokenizer: PreTrainedTokenizerBase, labels: list[str]) -> bool:
    firsts = [ids[0] for ids in label_token_ids(tokenizer, labels, eos=False)]
    return len(set(firsts)) == len(firsts)


def _batches(lengths: list[int], batch_size: int) -> Iterable[list[int]]:
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _pad_left(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad so the last prompt token sits in the last column, with true position ids."""
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(row)
        attention[i, width - len(row):] = 1
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    return input_ids.to(device), attention.to(device), positions.to(device)


def encode_prompts(tokenizer: PreTrainedTokenizerBase, names: list[str], max_prompt_tokens: int | None = None):
    """Token ids of each product's prompt; names over the budget keep their head and their
    ``" ->:"`` suffix. Returns (ids per name, truncated flags)."""
    suffix = tokenizer(format_prompt(""), add_special_tokens=False)["input_ids"]
    encoded, truncated = [], []
    for name in names:
        ids = tokenizer(format_prompt(name), add_special_tokens=False)["input_ids"]
        cut = max_prompt_tokens is not None and len(ids) > max_prompt_tokens
        if cut:
            ids = ids[: max_prompt_tokens - len(suffix)] + suffix
        encoded.append(ids)
        truncated.append(cut)
    return encoded, truncated


@torch.inference_mode()
def first_token_log_probs(model, tokenizer, prompts: list[list[int]], labels: list[str], batch_size: int = 64,
                          progress: bool = True) -> torch.Tensor:
    """Log-softmax over the labels' first-token logits at each prompt's end: (n_prompts, n_labels)."""
    first_ids = torch.tensor([ids[0] for ids in label_token_ids(tokenizer, labels, eos=False)])
    if len(set(first_ids.tolist())) != len(labels):
        raise ValueError("labels share a first token: use the full scorer")
    device = next(model.parameters()).device
    out = torch.empty((len(prompts), len(labels)))
    with tqdm(total=len(prompts), desc="scoring", unit="product", disable=not progress) as bar:
        for batch in _batches([len(p) for p in prompts], batch_size):
            input_ids, attention, positions = _pad_left([prompts[i] for i in batch], tokenizer.pad_token_id, device)
            logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                           logits_to_keep=1, use_cache=False).logits[:, -1, :]
            out[batch] = logits.float()[:, first_ids.to(device)].log_softmax(-1).cpu()
            bar.update(len(batch))
    return out


def best_labels(labels: list[str], log_probs: torch.Tensor) -> Scores:
    """The most probable label of each row of a (n_prompts, n_labels) log-probability matrix."""
    probs = log_probs.exp()
    best = probs.argmax(-1)
    return Scores([labels[b] for b in best], [float(probs[i, b]) for i, b in enumerate(best)])


def score_first_token(model, tokenizer, prompts: list[list[int]], labels: list[str], batch_size: int = 64,
                      progress: bool = True) -> Scores:
    return best_labels(labels, first_token_log_probs(model, tokenizer, prompts, labels, batch_size, progress))


@torch.inference_mode()
def label_log_likelihoods(model, tokenizer, prompts: list[list[int]], labels: list[str], batch_size: int = 64,
                          eos: bool = True, progress: bool = True) -> torch.Tensor:
    """Sum of log-probabilities of each label's completion after each prompt: (n_prompts, n_labels)."""
    completions = label_token_ids(tokenizer, labels, eos=eos)
    device = next(model.parameters()).device
    out = torch.empty((len(prompts), len(labels)))
    per_batch = max(1, batch_size // len(labels))
    with tqdm(total=len(prompts), desc="scoring (full)", unit="product", disable=not progress) as bar:
        for batch in _batches([len(p) for p in prompts], per_batch):
            rows = [prompts[i] + c for i in batch for c in completions]
            input_ids, attention, positions = _pad_left(rows, tokenizer.pad_token_id, device)
            logprobs = model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                             use_cache=False).logits.float().log_softmax(-1)
            width = input_ids.shape[1]
            for r, (i, c) in enumerate((i, c) for i in batch for c in range(len(labels))):
                target = completions[c]
                # logits at position t predict token t+1; the completion fills the last len(target) columns
                steps = torch.arange(width - len(target) - 1, width - 1, device=device)
                total = logprobs[r, steps, torch.tensor(target, device=device)].sum()
                out[i, c] = float(total)
            bar.update(len(batch))
    return out


def choose_scorer(name: str, tokenizer, labels: list[str]) -> str:
    if name == "auto":
        return "first_token" if first_tokens_distinct(tokenizer, labels) else "full"
    if name not in ("first_token", "full"):
        raise ValueError(f"eval.scorer must be auto, first_token or full, got {name!r}")
    return name


def label_log_probs(model, tokenizer, prompts: list[list[int]], labels: list[str], scorer: str = "auto",
                    batch_size: int = 64, progress: bool = True) -> torch.Tensor:
    """Log-probabilities over the label set, (n_prompts, n_labels), with the chosen scorer."""
    if choose_scorer(scorer, tokenizer, labels) == "first_token":
        return first_token_log_probs(model, tokenizer, prompts, labels, batch_size, progress)
    return label_log_likelihoods(model, tokenizer, prompts, labels, batch_size, progress=progress).log_softmax(-1)


def score(model, tokenizer, prompts: list[list[int]], labels: list[str], scorer: str = "auto",
          batch_size: int = 64, progress: bool = True) -> Scores:
    """Predict one label per prompt with the chosen scorer."""
    return best_labels(labels, label_log_probs(model, tokenizer, prompts, labels, scorer, batch_size, progress))
