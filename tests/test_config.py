import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_profile, load_recipe, parse_overrides, save_recipe, shipped_file
from pipeline.sweep import load_sweep

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "jobs" / "recipes"


TUTORIAL = Path(__file__).resolve().parents[2] / "shared" / "seed_tutorial.txt"


def _tutorial_assignments() -> dict[str, object]:
    """The ``name = value`` lines of the tutorial's code, evaluated as Python literals."""
    values = {}
    for match in re.finditer(r"^ *(\w+) = (.+?) *$", TUTORIAL.read_text(), re.M):
        try:
            values[match.group(1)] = ast.literal_eval(match.group(2))
        except (ValueError, SyntaxError):
            pass  # an expression, not a setting
    return values


@pytest.mark.skipif(not TUTORIAL.is_file(), reason="the seed tutorial sits beside the checkout in ../shared")
def test_seed_recipe_is_the_tutorials():
    """Checked against the tutorial's own text, so an edit of either side fails here."""
    tutorial = _tutorial_assignments()
    r = load_recipe(RECIPES / "instacart-seed.yaml")
    t, lora = r.train, r.lora
    ours = {"model_name": r.model.base_model, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
            "lora_r": lora.r, "per_device_train_batch_size": t.per_device_train_batch_size,
            "gradient_accumulation_steps": t.gradient_accumulation_steps, "optim": t.optim,
            "save_steps": t.save_steps, "logging_steps": t.logging_steps, "learning_rate": t.learning_rate,
            "max_grad_norm": t.max_grad_norm, "max_steps": t.max_steps, "warmup_ratio": t.warmup_ratio,
            "lr_scheduler_type": t.lr_scheduler_type, "max_seq_length": t.max_length}
    assert ours == {key: tutorial[key] for key in ours}
    text = TUTORIAL.read_text()
    assert 'target_modules=["q_proj","v_proj"]' in text and lora.target_modules == ["q_proj", "v_proj"]
    assert "fp16=True" in text and "group_by_length=True" in text and t.fp16 and t.group_by_length
    assert 'bnb_4bit_quant_type="nf4"' in text and r.model.bnb_4bit_quant_type == "nf4"
    assert "bnb_4bit_compute_dtype=torch.float16" in text and r.model.bnb_4bit_compute_dtype == "float16"


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


@pytest.mark.parametrize("kind, loader", [("recipe", load_recipe), ("profile", load_profile), ("sweep", load_sweep)])
def test_every_yaml_file_fails_the_same_way(tmp_path, kind, loader):
    """One reader for recipes, cluster profiles and sweeps: missing, invalid, not a mapping, unknown key."""
    with pytest.raises(ConfigError, match=r"nope.yaml: .* not found"):
        loader(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: not valid YAML: .*line \d+") as error:
        loader(broken)
    assert "\n" not in str(error.value)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n")
    with pytest.raises(ConfigError, match=r"list.yaml: expected a mapping at the top level, got list"):
        loader(listed)
    typo = tmp_path / "typo.yaml"
    typo.write_text({"recipe": "trian: {}\n", "profile": "partion: gpu\n",
                     "sweep": "method: grid\nparamters: {lora.r: {value: 4}}\n"}[kind])
    with pytest.raises(ConfigError, match=r"typo.yaml: .*unknown key\(s\) (trian|partion|paramters)"):
        loader(typo)


@pytest.mark.parametrize("option", ["--profile", "--sweep"])
def test_cli_names_a_bad_yaml_file_and_exits_2(tmp_path, option):
    broken = tmp_path / "broken.yaml"
    broken.write_text("method: grid\nparameters: {lora.r: {values: [4]}\n")  # unclosed mapping
    args = ["--sweep", str(broken)] if option == "--sweep" else [
        "--sweep", str(REPO / "jobs" / "sweeps" / "instacart.yaml"), "--profile", str(broken)]
    done = subprocess.run([sys.executable, "-m", "pipeline", "sweep", *args, "--executor", "debug",
                           "--output", str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"catalog-tuner sweep: error: {broken}: not valid YAML")


def test_shipped_files_resolve_from_any_working_directory(tmp_path, monkeypatch):
    """A Slurm job starts in whatever folder it was submitted from; jobs/ and slurm/ come from the checkout."""
    monkeypatch.chdir(tmp_path)
    assert shipped_file("jobs/clusters/dev.yaml") == REPO / "jobs" / "clusters" / "dev.yaml"
    assert shipped_file("cpu", "jobs/accelerate") == REPO / "jobs" / "accelerate" / "cpu.yaml"
    assert shipped_file("slurm/label_catalog.sh") == REPO / "slurm" / "label_catalog.sh"
    (tmp_path / "jobs" / "clusters").mkdir(parents=True)
    (tmp_path / "jobs" / "clusters" / "dev.yaml").write_text("name: mine\n")
    assert load_profile("jobs/clusters/dev.yaml").name == "mine"  # the user's own file comes first
    with pytest.raises(ConfigError, match="tpu: accelerate config not found"):
        shipped_file("tpu", "jobs/accelerate", what="accelerate config")


def test_label_takes_overrides_before_or_after_its_other_options(monkeypatch):
    """One override syntax: label's section.key=value may follow --catalog's paths (whose list
    takes them in) or any other option; a Hive-style path with '=' stays a path."""
    import pipeline.label
    from pipeline.cli import main

    seen = {}

    def label_catalogs(adapter, catalogs, output, **options):
        seen.update(catalogs=catalogs, overrides=options["overrides"])
        return []

    monkeypatch.setattr(pipeline.label, "label_catalogs", label_catalogs)
    monkeypatch.setattr(pipeline.label, "summarize", lambda outcomes: "")
    assert main(["label", "--adapter", "run", "--catalog", "shop/date=2026-12-05/a.parquet", "b.parquet",
                 "eval.compile=true", "--output", "out", "label.review_max=5"]) == 0
    assert seen == {"catalogs": ["shop/date=2026-12-05/a.parquet", "b.parquet"],
                    "overrides": ["eval.compile=true", "label.review_max=5"]}

