from pathlib import Path

import pytest

from pipeline.config import ConfigError, Recipe, load_recipe, parse_overrides, save_recipe

RECIPES = Path(__file__).resolve().parents[1] / "jobs" / "recipes"


def test_seed_recipe_is_the_tutorials():
    r = load_recipe(RECIPES / "instacart-seed.yaml")
    assert r.model.base_model == "TinyPixel/Llama-2-7B-bf16-sharded"
    m = r.model
    assert (m.quantization, m.bnb_4bit_quant_type, m.bnb_4bit_compute_dtype) == ("4bit", "nf4", "float16")
    assert (r.lora.r, r.lora.alpha, r.lora.dropout, r.lora.target_modules) == (64, 16, 0.1, ["q_proj", "v_proj"])
    t = r.train
    assert (t.optim, t.learning_rate, t.lr_scheduler_type, t.warmup_ratio, t.max_grad_norm) == (
        "paged_adamw_32bit", 2e-4, "constant", 0.03, 0.3)
    assert (t.max_steps, t.per_device_train_batch_size, t.gradient_accumulation_steps, t.max_length) == (120, 4, 4, 512)
    assert (t.save_steps, t.logging_steps, t.fp16, t.group_by_length) == (10, 1, True, True)
    assert (r.data.join_order, r.data.keep_missing, r.data.test_size, r.data.split_seed) == ("tutorial", True, 0.2, 42)


def test_default_recipe_runs_on_the_embedded_model():
    r = load_recipe(RECIPES / "instacart-smollm2.yaml")
    assert r.model.base_model == "embedded:smollm2-135m"
    assert r.model.trust_remote_code is False


def test_overrides_are_typed():
    r = load_recipe(RECIPES / "instacart-smollm2.yaml",
                    ["train.learning_rate=1e-4", "lora.r=8", "lora.target_modules=q_proj,v_proj",
                     "train.bf16=true", "eval.max_samples=100", "data.max_train_samples=null"])
    assert r.train.learning_rate == 1e-4 and isinstance(r.train.learning_rate, float)
    assert r.lora.r == 8
    assert r.lora.target_modules == ["q_proj", "v_proj"]
    assert r.train.bf16 is True
    assert r.eval.max_samples == 100
    assert r.data.max_train_samples is None


def test_override_all_linear_stays_a_string():
    assert load_recipe(None, ["lora.target_modules=all-linear"]).lora.target_modules == "all-linear"


@pytest.mark.parametrize("override, message", [
    ("train.learning_rat=1e-4", "unknown key(s) learning_rat"),
    ("trainer.lr=1", "unknown key(s) trainer"),
    ("lora.r=eight", "lora.r: expected int"),
    ("lora.r=1.5", "lora.r: expected an integer"),
    ("train.bf16=maybe", "train.bf16: expected true/false"),
    ("train.learning_rate", "expected section.key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_recipe(None, [override])


def test_bad_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: train: unknown key\(s\) max_stepz"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_recipe(tmp_path / "list.yaml")


def test_saved_recipe_round_trips(tmp_path):
    r = load_recipe(None, ["train.max_steps=7", "lora.target_modules=[q_proj]"])
    save_recipe(r, tmp_path / "config.yaml")
    assert load_recipe(tmp_path / "config.yaml") == r


def test_parse_overrides_nests():
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}
    assert Recipe().train.seed == 42
