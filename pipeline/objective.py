"""``train.objective``: what training minimises.

- ``lm`` (trl's own): the language-model loss on the completion's tokens, a softmax over the
  whole vocabulary (49,152 tokens for SmolLM2) at every completion position.
- ``label_softmax``: cross-entropy over the label set at the answer position, the quantity the
  first-token scorer ships (``pipeline.scoring.first_token_log_probs``): the logits of the labels'
  first tokens, from the decoder's last hidden state where the completion starts, with
  ``train.label_smoothing``. It needs a label set whose first tokens differ (the departments;
  aisles written ``data.completion: distinct_first``). A run trained either way is scored,
  calibrated and labeled alike.
"""

from __future__ import annotations

import torch
from trl import SFTTrainer

from pipeline.errors import ConfigError
from pipeline.passes import head_logits, label_token_ids

OBJECTIVES = ("lm", "label_softmax")
IGNORED = -100  # the labels' value where no loss is taken (the prompt, padding)


def first_token_ids(tokenizer, texts: list[str]) -> torch.Tensor:
    """Each label's first completion token, as training and the first-token scorer see it."""
    ids = torch.tensor([sequence[0] for sequence in label_token_ids(tokenizer, texts, eos=False)])
    if len(set(ids.tolist())) != len(texts):
        raise ConfigError("train.objective=label_softmax needs labels whose first tokens differ; the labels share "
                          "some: write them with data.completion=distinct_first, or use train.objective=lm")
    return ids


def label_softmax_loss(model, inputs: dict[str, torch.Tensor], label_ids: torch.Tensor,
                       label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of each example's label among ``label_ids`` (first tokens, label order),
    from the hidden state of the position that predicts the completion's first token."""
    labels = inputs["labels"]
    starts = (labels != IGNORED).int().argmax(1)  # the completion's first token in each row
    if (labels.gather(1, starts[:, None]) == IGNORED).any():
        raise ConfigError("train.objective=label_softmax: an example has no completion token")
    first = labels.gather(1, starts[:, None])
    matches = first == label_ids.to(first.device)[None, :]
    if not matches.any(1).all():
        unknown = sorted(set(first[~matches.any(1)].squeeze(1).tolist()))
        raise ConfigError(f"train.objective=label_softmax: completions start with token(s) {unknown}, the first "
                          "token of no label")
    target = matches.int().argmax(1)
    hidden = model.get_decoder()(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                                 use_cache=False).last_hidden_state
    answer = hidden[torch.arange(len(starts), device=hidden.device), starts - 1]
    logits = head_logits(model, answer, label_ids.to(hidden.device))
    return torch.nn.functional.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)


class LabelSoftmaxTrainer(SFTTrainer):
    """trl's SFT trainer (data, collation, PEFT, checkpoints, logging) with the label-softmax loss."""

    def __init__(self, *args, label_ids: torch.Tensor, label_smoothing: float = 0.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.label_ids = label_ids
        self.label_smoothing = label_smoothing

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = label_softmax_loss(model, inputs, self.label_ids, self.label_smoothing)
        return (loss, None) if return_outputs else loss
