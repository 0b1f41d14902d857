"""Constrained label scoring: the model picks one label of the label set, with a confidence.

:func:`predict` is the one scoring call: the inference path (``pipeline.predict``) makes it on
a merged model, the training benchmark's accuracy curve on the model being trained.

Free generation can answer anything ("Department - breakfast", or a paragraph); scoring the
label set always yields a valid label. Two scorers (chosen by :func:`choose_scorer`):

- first-token: when every label's first completion token is distinct (the 21 Instacart
  departments are; a run with ``data.completion: distinct_first`` writes any label set so,
  :func:`completion_texts`), one forward pass per product and the logits at the last prompt
  position decide; confidence is the softmax over the labels' first-token logits.
- trie: the same exact log-likelihoods as the full scorer for label sets whose labels share
  leading tokens (aisles, taxonomy paths): one forward pass over the prompt, then one over
  the labels' token trie from the prompt's cached keys/values, with a tree attention mask so
  that every shared prefix is computed once per product (``pipeline.trie``).
- full: the exact log-likelihood of each whole completion (label tokens + EOS), one sequence
  per (product, label); the reference the trie scorer is tested against.

Labeling with the trie scorer searches instead of scoring every label
(``pipeline.trie.trie_search_log_probs``): the top label stays exact and the probabilities stay within a
stated tolerance (``eval.trie_tolerance``), in the shipped space (blend and temperature).

All batch prompts sorted by token length (little padding) under ``torch.inference_mode``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from pipeline.data import format_prompt
from pipeline.errors import ConfigError
from pipeline.passes import batches_by_length, head_logits, label_token_ids, pad_left
from pipeline.progress import progress_bar
from pipeline.trie import SearchSpace, trie_log_likelihoods, trie_search_log_probs


@dataclass
class Scores:
    labels: list[str]
    """Predicted label per input, in input order."""
    confidence: list[float]
    """Softmax probability of the predicted label within the label set."""


@dataclass
class Prediction:
    """What scoring a list of product names gives, row for row."""

    labels: list[str | None]
    """The most probable label; None where the name is empty."""
    confidences: list[float | None]
    """Its probability within the label set; None where the name is empty."""
    log_probs: torch.Tensor
    """(names, labels) log-probabilities over the label set; rows of NaN where the name is empty."""
    statuses: list[str]
    """``ok``, ``empty_name``, or ``truncated`` (the name kept its head within the prompt budget)."""
    seconds: float | None = None
    """Wall time of the scoring that made it, where it was timed (a reused prediction keeps it)."""
    hidden: torch.Tensor | None = None
    """(names, hidden size) float32: the decoder's last hidden state at each prompt's end, where
    asked for (the fused candidate's features, ``pipeline.fused``); rows of NaN where the name is empty."""


def first_tokens_distinct(tokenizer: PreTrainedTokenizerBase, labels: list[str]) -> bool:
    firsts = [ids[0] for ids in label_token_ids(tokenizer, labels, eos=False)]
    return len(set(firsts)) == len(firsts)


COMPLETION_STYLES = ("label", "distinct_first")


def completion_texts(tokenizer: PreTrainedTokenizerBase, labels: list[str], style: str = "label") -> list[str]:
    """What the model is trained to write for each label (``data.completion``), in label order.

    ``label``: the label itself. ``distinct_first``: each label written so that its first token
    is its own, which makes any label set first-token scorable: one forward pass a product, where
    the 134 aisles, which share leading words ("fresh fruits", "fresh herbs"), otherwise take the
    trie scorer's hundreds of positions. A label whose first token is taken is written from
    another of its words, inverted-heading style (``"fresh fruits"`` -> ``"fruits, fresh"``), or
    from a word with its initial's case flipped where those are taken too (``"Counter, seafood"``).
    Words are assigned by a maximum matching of labels to first tokens (shortest augmenting paths,
    each label trying its own first word first: a set whose first tokens already differ is left as
    it is), so the set fails only where no assignment exists, and the error names the labels left
    over. Deterministic in (tokenizer, labels): training and inference compute the same texts.
    """
    if style not in COMPLETION_STYLES:
        raise ConfigError(f"data.completion must be one of {', '.join(COMPLETION_STYLES)}, got {style!r}")
    if style == "label":
        return list(labels)
    options: list[dict[int, str]] = []  # per label: first token -> the text that starts with it, preferred first
    for label in labels:
        words = label.split()
        texts = []
        for flip in (False, True):  # the words as written first, then with their initial's case flipped
            for k, word in enumerate(words):
                key = word[:1].swapcase() + word[1:] if flip else word
                rest = " ".join(words[:k] + words[k + 1:])
                texts.append(f"{key} {rest}".strip() if k == 0 else f"{key}, {rest}")
        options.append({})
        for ids, text in zip(label_token_ids(tokenizer, texts, eos=False), texts):
            options[-1].setdefault(ids[0], text)
    chosen: list[int | None] = [None] * len(labels)
    owner: dict[int, int] = {}
    for start in range(len(labels)):
        reached_from: dict[int, int] = {}  # token -> the label whose option it is on the path
        queue, free = [start], None
        for label in queue:  # breadth first over alternating paths; the queue grows as it is read
            for token in options[label]:
                if token in reached_from:
                    continue
                reached_from[token] = label
                if token not in owner:
                    free = token
                    break
                queue.append(owner[token])
            if free is not None:
                break
        token = free
        while token is not None:  # flip the path back to `start`, whose old token is None
            label = reached_from[token]
            token, chosen[label] = chosen[label], token
            owner[chosen[label]] = label
    left = [label for label, token in zip(labels, chosen) if token is None]
    if left:
        named = ", ".join(map(repr, left[:10])) + (", ..." if len(left) > 10 else "")
        raise ConfigError(f"data.completion=distinct_first: no first token of their own for {len(left)} of "
                          f"{len(labels)} labels ({named}); use data.completion=label (the trie scorer)")
    return [options[i][token] for i, token in enumerate(chosen)]


def encode_prompts(tokenizer: PreTrainedTokenizerBase, names: list[str], max_prompt_tokens: int | None = None):
    """Token ids of each product's prompt; names over the budget keep their head and their
    ``" ->:"`` suffix. Returns (ids per name, truncated flags)."""
    suffix = tokenizer(format_prompt(""), add_special_tokens=False)["input_ids"]
    if not names:
        return [], []
    # One call for the list: a fast tokenizer encodes it in Rust, on every core. On an H200's
    # 16-core host, 50,000 names took 1.06 s against 2.60 s a call per name (results/README.md).
    encoded = tokenizer([format_prompt(name) for name in names], add_special_tokens=False)["input_ids"]
    truncated = [max_prompt_tokens is not None and len(ids) > max_prompt_tokens for ids in encoded]
    return [ids[: max_prompt_tokens - len(suffix)] + suffix if cut else ids
            for ids, cut in zip(encoded, truncated)], truncated


@dataclass
class Encoded:
    """A list of names made ready for a scorer: the model-free part of :func:`predict`, which a
    caller can do ahead (``pipeline.label`` encodes the next record batch while the model scores
    this one)."""

    size: int
    """How many names, empty ones included."""
    usable: list[int]
    """Indices of the names that are not empty: only they are scored."""
    prompts: list[list[int]]
    """Prompt token ids of the usable names (:func:`encode_prompts`)."""
    truncated: list[bool]


def encode_names(tokenizer: PreTrainedTokenizerBase, names: list[str | None],
                 max_prompt_tokens: int | None = None) -> Encoded:
    usable = [i for i, name in enumerate(names) if name is not None and str(name).strip()]
    prompts, truncated = encode_prompts(tokenizer, [str(names[i]) for i in usable], max_prompt_tokens)
    return Encoded(len(names), usable, prompts, truncated)


@torch.inference_mode()
def first_token_log_probs(model, tokenizer, prompts: list[list[int]], labels: list[str], batch_size: int = 64,
                          progress: bool = True, hidden_out: torch.Tensor | None = None) -> torch.Tensor:
    """Log-softmax over the labels' first-token logits at each prompt's end: (n_prompts, n_labels).
    ``hidden_out`` (n_prompts, hidden size), where given, receives the hidden states they are read from."""
    first_ids = torch.tensor([ids[0] for ids in label_token_ids(tokenizer, labels, eos=False)])
    if len(set(first_ids.tolist())) != len(labels):
        raise ConfigError("eval.scorer=first_token, but the labels share a first token: use auto or full")
    device = next(model.parameters()).device
    decoder, first_ids = model.get_decoder(), first_ids.to(device)
    out = torch.empty((len(prompts), len(labels)))
    with progress_bar(len(prompts), "scoring", "product", disable=not progress) as bar:
        for batch in batches_by_length([len(p) for p in prompts], batch_size):
            input_ids, attention, positions = pad_left([prompts[i] for i in batch], tokenizer.pad_token_id, device)
            hidden = decoder(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                             use_cache=False).last_hidden_state[:, -1]
            out[batch] = head_logits(model, hidden, first_ids).float().log_softmax(-1).cpu()
            if hidden_out is not None:
                hidden_out[batch] = hidden.float().cpu()
            bar.update(len(batch))
    return out


def best_labels(labels: list[str], log_probs: torch.Tensor) -> Scores:
    """The most probable label of each row of a (n_prompts, n_labels) log-probability matrix."""
    probs = log_probs.exp()
    best = probs.argmax(-1)
    return Scores([labels[b] for b in best], [float(probs[i, b]) for i, b in enumerate(best)])


@torch.inference_mode()
def label_log_likelihoods(model, tokenizer, prompts: list[list[int]], labels: list[str], batch_size: int = 64,
                          eos: bool = True, progress: bool = True) -> torch.Tensor:
    """Sum of log-probabilities of each label's completion after each prompt: (n_prompts, n_labels)."""
    completions = label_token_ids(tokenizer, labels, eos=eos)
    device = next(model.parameters()).device
    out = torch.empty((len(prompts), len(labels)))
    per_batch = max(1, batch_size // len(labels))
    with progress_bar(len(prompts), "scoring (full)", "product", disable=not progress) as bar:
        for batch in batches_by_length([len(p) for p in prompts], per_batch):
            rows = [prompts[i] + c for i in batch for c in completions]
            input_ids, attention, positions = pad_left(rows, tokenizer.pad_token_id, device)
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
    """The scorer a label set gets: ``auto`` is first-token where the labels' first tokens differ,
    else the trie scorer; ``full`` only when asked for (it is the trie scorer's reference)."""
    if name == "auto":
        return "first_token" if first_tokens_distinct(tokenizer, labels) else "trie"
    if name not in ("first_token", "trie", "full"):
        raise ConfigError(f"eval.scorer must be auto, first_token, trie or full, got {name!r}")
    return name


def label_log_probs(model, tokenizer, prompts: list[list[int]], labels: list[str], scorer: str = "auto",
                    batch_size: int = 64, progress: bool = True) -> torch.Tensor:
    """Log-probabilities over the label set, (n_prompts, n_labels), with the chosen scorer."""
    chosen = choose_scorer(scorer, tokenizer, labels)
    if chosen == "first_token":
        return first_token_log_probs(model, tokenizer, prompts, labels, batch_size, progress)
    if chosen == "trie":
        return trie_log_likelihoods(model, tokenizer, prompts, labels, batch_size, progress).log_softmax(-1)
    return label_log_likelihoods(model, tokenizer, prompts, labels, batch_size, progress=progress).log_softmax(-1)


def predict(model, tokenizer, names: list[str | None] | Encoded, labels: list[str], *, scorer: str = "auto",
            batch_size: int = 64, max_prompt_tokens: int | None = None, progress: bool = False,
            search: SearchSpace | None = None, texts: list[str] | None = None, hidden: bool = False) -> Prediction:
    """Score raw product names (or names already :func:`encode_names`'d) against the label set;
    empty names get no label. With ``search`` (offsets row for row with ``names``) the trie
    scorer's labels come from :func:`trie_search_log_probs`, in that space. ``texts`` are what
    the model writes for each label (:func:`completion_texts`; the labels themselves by default):
    they are scored, the labels are reported. ``hidden`` keeps each prompt's last hidden state
    (:attr:`Prediction.hidden`), which only the first-token scorer reads."""
    encoded = names if isinstance(names, Encoded) else encode_names(tokenizer, names, max_prompt_tokens)
    written = texts or labels
    usable = encoded.usable
    log_probs = torch.full((encoded.size, len(labels)), float("nan"))
    predicted: list[str | None] = [None] * encoded.size
    confidences: list[float | None] = [None] * encoded.size
    statuses = ["empty_name"] * encoded.size
    states = None
    if hidden:
        if choose_scorer(scorer, tokenizer, written) != "first_token":
            raise ConfigError("hidden states are read by the first-token scorer only (the fused candidate "
                              "needs labels whose first tokens differ: data.completion=distinct_first)")
        states = torch.full((encoded.size, model.config.get_text_config().hidden_size), float("nan"))
    if usable:
        if states is not None:
            kept = torch.empty((len(usable), states.shape[1]))
            scored = first_token_log_probs(model, tokenizer, encoded.prompts, written, batch_size, progress, kept)
            states[usable] = kept
        elif search is not None and choose_scorer(scorer, tokenizer, written) == "trie":
            space = SearchSpace(search.offsets[usable], search.temperature, search.tolerance)
            scored = trie_search_log_probs(model, tokenizer, encoded.prompts, written, space, batch_size, progress)
        else:
            scored = label_log_probs(model, tokenizer, encoded.prompts, written, scorer, batch_size, progress)
        log_probs[usable] = scored
        best = best_labels(labels, scored)
        for k, i in enumerate(usable):
            predicted[i], confidences[i] = best.labels[k], best.confidence[k]
            statuses[i] = "truncated" if encoded.truncated[k] else "ok"
    return Prediction(predicted, confidences, log_probs, statuses, hidden=states)


def blend_log_probs(log_probs: torch.Tensor, lexical_scores: torch.Tensor, weight: float) -> torch.Tensor:
    """The model's label log-probabilities plus ``weight`` times a lexical model's per-label scores
    (the TF-IDF + SVM's decision values), renormalised over the label set.

    Both inputs are (names, labels) in the same label order; the result is again a log-probability
    matrix, so :func:`best_labels` reads labels and confidences from it like from the model's own.
    """
    return (log_probs + weight * lexical_scores).log_softmax(-1)
