"""Error analysis on a real (tiny) run; the figures themselves live in results/, never in asserts."""

import shutil

import pandas as pd
import pytest

from pipeline.analysis import analyze_errors, normalized_name, telling_words


def test_telling_words_are_rare_and_pure():
    assert normalized_name("Organic Whole Milk, 1 gal") == normalized_name("organic  whole milk gal")
    train = pd.DataFrame({"product_name": ["Amy's Burrito", "Amy's Pizza", "Amy's Soup", "Whole Milk", "Milk Bread"],
                          "department": ["frozen", "frozen", "canned goods", "dairy eggs", "bakery"]})
    assert telling_words(train, max_names=3, min_purity=0.6) == {
        "amy": "frozen", "s": "frozen", "burrito": "frozen", "pizza": "frozen", "soup": "canned goods",
        "whole": "dairy eggs", "bread": "bakery"}


@pytest.mark.slow
def test_errors_split_the_test_rows_between_model_and_baseline(adapter_run, tmp_path):
    from pipeline.evaluate import evaluate
    from pipeline.predict import run_recipe

    run = tmp_path / "run"
    shutil.copytree(adapter_run, run)
    metrics = evaluate(run, recipe=run_recipe(run, ["eval.max_samples=40"]), progress=False)
    errors = analyze_errors(run, train_samples=16)
    assert errors["test_products"] == 40 and errors["model_accuracy"] == round(metrics["test"]["accuracy"], 4)
    assert errors["baseline_accuracy"] == round(metrics["test"]["baseline"]["accuracy"], 4)
    predictions = pd.read_parquet(run / "predictions_test.parquet")
    model_right = int((predictions["predicted"] == predictions["department"]).sum())
    told = errors["telling_word_names_the_truth"]
    assert told["both_right"]["rows"] + told["model_only_right"]["rows"] == model_right
    assert all(0 <= told[k]["told"] <= told[k]["rows"] for k in ("both_right", "neither_right"))
    assert errors["train_fit"]["train_products"] == 16 and 0 <= errors["train_fit"]["model_accuracy"] <= 1
    assert errors["config"]["data"]["dir"] == metrics["test"]["eval_data"].rsplit("/", 1)[0]
