"""Two label levels: aisles inside departments, from the embedded catalog or a catalog's own paths."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import DataConfig, Recipe, load_recipe
from pipeline.data import level_labels, prepare
from pipeline.errors import ConfigError, DataError
from pipeline.evaluate import evaluate
from pipeline.label import label_catalogs
from pipeline.model import InferencePath
from pipeline.predict import Predictor, run_recipe
from pipeline.scoring import Prediction
from pipeline.train import train

REPO = Path(__file__).resolve().parents[1]


def test_the_embedded_catalog_has_aisles_each_inside_one_department(data_dir):
    tree = json.loads((data_dir / "taxonomy.json").read_text())
    departments = json.loads((data_dir / "labels.json").read_text())
    assert tree["labels"]["department"] == departments and len(departments) == 20
    parent = tree["parent"]["aisle"]
    assert sorted(parent) == tree["labels"]["aisle"] and set(parent.values()) == set(departments)
    assert len(parent) == 133  # the 134 aisles but 'missing', held out with its department
    rows = pd.concat([pd.read_parquet(data_dir / f"{split}.parquet") for split in ("train", "validation", "test")])
    assert (rows["aisle"].map(parent) == rows["department"]).all()
    assert level_labels(data_dir, "aisle") == tree["labels"]["aisle"]


def category_catalog(tmp_path, categories: list[str]):
    path = tmp_path / "catalog.parquet"
    names = [f"product {i}" for i in range(len(categories))]
    pq.write_table(pa.table({"product_id": list(range(len(categories))), "product_name": names,
                             "category": categories}), path)
    return path


def test_a_path_like_category_gives_both_levels(tmp_path):
    categories = ["pantry/baking ingredients", "pantry / spices", "frozen/frozen pizza", "frozen/ice cream"] * 10
    summary = prepare(DataConfig(source="parquet", catalog=str(category_catalog(tmp_path, categories)),
                                 validation_size=0), tmp_path / "data")
    tree = json.loads((tmp_path / "data" / "taxonomy.json").read_text())
    assert summary["aisles"] == 4 and tree["parent"]["aisle"] == {
        "baking ingredients": "pantry", "spices": "pantry", "frozen pizza": "frozen", "ice cream": "frozen"}


def test_a_leaf_under_two_parents_is_named(tmp_path):
    categories = ["pantry/baking", "frozen/pizza", "bakery/baking", "frozen/ice cream"] * 10
    with pytest.raises(DataError, match=r"aisle 'baking' is under 2 departments \(bakery, pantry\); e.g. product_id"):
        prepare(DataConfig(source="parquet", catalog=str(category_catalog(tmp_path, categories))), tmp_path / "data")


def test_a_department_is_its_aisles_summed_and_never_disagrees_with_the_aisle():
    labels = ["bread", "cookies", "ice cream", "pizza", "soda"]
    parent = {"bread": "bakery", "cookies": "bakery", "ice cream": "frozen", "pizza": "frozen", "soda": "drinks"}
    predictor = Predictor(run_dir=None, recipe=Recipe(), model=None, tokenizer=None, labels=labels, texts=labels,
                          scorer="trie",
                          max_prompt_tokens=8, batch_size=1, device="cpu", path=InferencePath(torch.float32),
                          level="aisle", parent=parent)
    probs = torch.tensor([[0.10, 0.10, 0.35, 0.30, 0.15],   # the top aisle's department is also the top department
                          [0.30, 0.25, 0.31, 0.04, 0.10],   # bakery sums to 0.55, but the aisle is ice cream
                          [float("nan")] * 5])
    prediction = Prediction(["ice cream", "ice cream", None], [0.35, 0.31, None], probs.log(),
                            ["ok", "ok", "empty_name"])
    departments, confidences = predictor.parent_prediction(prediction)
    assert departments == ["frozen", "frozen", None]
    assert confidences[0] == pytest.approx(0.65) and confidences[1] == pytest.approx(0.35) and confidences[2] is None


def test_only_the_trie_scorer_searches_and_a_tolerance_outside_0_1_is_named():
    def predictor(scorer: str, tolerance: float) -> Predictor:
        recipe = Recipe()
        recipe.eval.trie_tolerance = tolerance
        return Predictor(run_dir=None, recipe=recipe, model=None, tokenizer=None, labels=["a", "b"],
                         texts=["a", "b"], scorer=scorer,
                         max_prompt_tokens=8, batch_size=1, device="cpu", path=InferencePath(torch.float32))

    offsets = torch.zeros((2, 2))  # an uncalibrated run's
    space = predictor("trie", 0.05).search_space(offsets)
    assert space.tolerance == 0.05 and space.temperature == 1.0
    assert predictor("first_token", 0.05).search_space(offsets) is None
    assert predictor("trie", 0.0).search_space(offsets) is None  # every label scored
    with pytest.raises(ConfigError, match=r"eval.trie_tolerance must be in \[0, 1\), got 1.5"):
        predictor("trie", 1.5).search_space(offsets)


def test_an_aisle_level_run_labels_and_evaluates_both_levels(aisle_run, data_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(aisle_run, run)
    tree = json.loads((data_dir / "taxonomy.json").read_text())
    assert json.loads((run / "labels.json").read_text()) == tree["labels"]["aisle"]
    # The aisle-level baseline is fitted beside the training split: a 4,000-row one fits in seconds.
    data = tmp_path / "data"
    shutil.copytree(data_dir, data, ignore=shutil.ignore_patterns("baseline*"))
    pd.read_parquet(data_dir / "train.parquet").head(4000).to_parquet(data / "train.parquet")
    metrics = evaluate(run, data / "test.parquet", run_recipe(run, ["eval.max_samples=6"]), progress=False)
    block = metrics["test"]
    assert block["label_level"] == "aisle" and block["scorer"] == "trie"
    assert block["department"]["implied_by"] == "aisle"
    assert "department" in block["baseline"]
    predictions = pd.read_parquet(run / "predictions_test.parquet")
    parent = tree["parent"]["aisle"]
    assert (predictions["predicted"].map(parent) == predictions["predicted_department"]).all()
    implied = (predictions["predicted_department"] == predictions["department"]).mean()
    assert block["department"]["accuracy"] == pytest.approx(implied)

    catalog = tmp_path / "catalog.parquet"
    pq.write_table(pa.table({"product_id": predictions["product_id"], "product_name": predictions["product_name"]}),
                   catalog)
    label_catalogs(run, [str(catalog)], tmp_path / "labeled", batch_size=8, progress=False)
    labeled = pd.read_parquet(tmp_path / "labeled" / "catalog.parquet")
    assert labeled.columns.tolist() == ["product_id", "product_name", "aisle", "aisle_confidence", "department",
                                        "department_confidence", "label_status", "labeled_by", "labeled_at"]
    assert labeled["aisle"].tolist() == predictions["predicted"].tolist()  # the search's top label is exact
    tolerance = run_recipe(run).eval.trie_tolerance
    assert (labeled["aisle_confidence"] - predictions["confidence"]).abs().max() <= tolerance
    assert (labeled["department_confidence"] - predictions["predicted_department_confidence"]).abs().max() <= tolerance
    entry = json.loads((tmp_path / "labeled" / "_manifest" / "catalog.parquet.json").read_text())
    assert entry["scorer"] == "trie" and entry["trie_tolerance"] == tolerance  # how each file was labeled
    assert (labeled["aisle"].map(parent) == labeled["department"]).all()
    assert (labeled["department_confidence"] >= labeled["aisle_confidence"] - 1e-6).all()


def test_a_calibrated_aisle_run_labels_through_its_blend_what_its_exact_scores_ship(aisle_run, data_dir, tmp_path):
    """Labeling searches in the shipped space (blend + temperature); evaluation applies the same
    calibration to every label's exact score. Same labels, confidences within the tolerance."""
    from pipeline import calibrate

    run = tmp_path / "run"
    shutil.copytree(aisle_run, run)
    data = tmp_path / "data"
    shutil.copytree(data_dir, data, ignore=shutil.ignore_patterns("baseline*"))
    pd.read_parquet(data_dir / "train.parquet").head(4000).to_parquet(data / "train.parquet")
    # the adapter and the blend only: this is a test of the blend's search (the lexical model
    # alone would win against a 3-step adapter, and it needs no search)
    calibrate.fit(run, run_recipe(run, [f"data.dir={data}", "eval.max_samples=16", "eval.candidates=[adapter,blend]"]),
                  progress=False)
    predictor = Predictor.from_run(run, batch_size=8)
    assert predictor.path.name == "float32"  # auto, on any CPU: the search's contract holds in fp32
    assert predictor.calibration.blend_weight > 0  # the search runs with the lexical model's offsets
    names = pd.read_parquet(data / "validation.parquet")["product_name"].head(16).tolist()
    calibration = predictor.calibration
    exact = calibration.apply(predictor.predict(names, calibrated=False), calibration.offsets(names))  # its scores
    searched = predictor.predict(names)
    assert searched.labels == exact.labels
    errors = [abs(a - b) for a, b in zip(searched.confidences, exact.confidences)]
    assert max(errors) <= predictor.recipe.eval.trie_tolerance
    departments = [predictor.parent_prediction(p)[1] for p in (searched, exact)]
    assert max(abs(a - b) for a, b in zip(*departments)) <= predictor.recipe.eval.trie_tolerance


def test_each_candidate_of_an_aisle_run_records_the_departments_it_implies(aisle_run, data_dir, tmp_path):
    """An aisle-level run competes for the department task too: calibration.json gives each
    candidate's department accuracy, that of the parents of the aisles it predicts, which is never
    below its aisle accuracy (a right aisle is a right department)."""
    from pipeline import baseline, calibrate

    run = tmp_path / "run"
    shutil.copytree(aisle_run, run)
    data = tmp_path / "data"
    shutil.copytree(data_dir, data, ignore=shutil.ignore_patterns("baseline*"))
    pd.read_parquet(data_dir / "train.parquet").head(4000).to_parquet(data / "train.parquet")
    result = calibrate.fit(run, run_recipe(run, [f"data.dir={data}", "eval.max_samples=16",
                                                 "eval.candidates=[lexical,adapter]"]), progress=False)
    parent = json.loads((run / "taxonomy.json").read_text())["parent"]["aisle"]
    validation = pd.read_parquet(data / "validation.parquet").head(16)
    truth = validation["aisle"].map(parent)
    lexical = baseline.fitted(data / "train.parquet", pd.read_parquet(data / "train.parquet"), "aisle")["model"]
    predicted = {"lexical": list(lexical.predict(validation["product_name"].tolist())),
                 "adapter": Predictor.from_run(run, calibrated=False).predict(
                     validation["product_name"].tolist(), calibrated=False).labels}
    for name, aisles in predicted.items():
        figures = result["candidates"][name]
        assert figures["department"]["accuracy"] == pytest.approx(
            float((pd.Series(aisles).map(parent).to_numpy() == truth.to_numpy()).mean()), abs=1e-4), name
        assert figures["department"]["accuracy"] >= figures["accuracy"]
    assert result["candidates"]["lexical"]["department"]["accuracy"] > result["candidates"]["lexical"]["accuracy"]


def instacart_csvs(tmp_path, aisle_of_department: list[tuple[int, int]]) -> DataConfig:
    """products.csv (aisle_id, department_id per row, cycling), departments.csv and aisles.csv."""
    rows = [(i + 1, f"product {i}", *aisle_of_department[i % len(aisle_of_department)]) for i in range(60)]
    pd.DataFrame(rows, columns=["product_id", "product_name", "aisle_id", "department_id"]).to_csv(
        tmp_path / "products.csv", index=False)
    pd.DataFrame({"department_id": [1, 2], "department": ["pantry", "frozen"]}).to_csv(
        tmp_path / "departments.csv", index=False)
    pd.DataFrame({"aisle_id": [10, 11, 12], "aisle": ["baking", "pizza", "ice cream"]}).to_csv(
        tmp_path / "aisles.csv", index=False)
    return DataConfig(source="csv", products=str(tmp_path / "products.csv"),
                      departments=str(tmp_path / "departments.csv"), aisles=str(tmp_path / "aisles.csv"),
                      validation_size=0)


@pytest.mark.slow
def test_a_distinct_first_aisle_run_scores_in_one_pass_and_writes_the_aisles(data_dir, tmp_path):
    run = tmp_path / "run"
    recipe = load_recipe(REPO / "jobs" / "recipes" / "instacart-smollm2.yaml", [
        f"data.dir={data_dir}", "data.label_level=aisle", "data.completion=distinct_first",
        "data.max_train_samples=48", "train.max_steps=2", "train.save_steps=100",
        "train.per_device_train_batch_size=8"])
    train(recipe, run, evaluate_after=False)
    predictor = Predictor.from_run(run, batch_size=8)  # the labeler's batches: bf16 ties follow them
    assert predictor.scorer == "first_token"
    assert "fruits, fresh" in predictor.texts and "fruits, fresh" not in predictor.labels

    names = pd.read_parquet(data_dir / "validation.parquet")["product_name"].head(24).tolist()
    catalog = tmp_path / "catalog.parquet"
    pq.write_table(pa.table({"product_id": list(range(len(names))), "product_name": names}), catalog)
    label_catalogs(run, [str(catalog)], tmp_path / "labeled", batch_size=8, progress=False)
    labeled = pd.read_parquet(tmp_path / "labeled" / "catalog.parquet")
    parent = json.loads((data_dir / "taxonomy.json").read_text())["parent"]["aisle"]
    assert labeled["aisle"].isin(parent).all()  # the labels, never the texts the model writes
    assert (labeled["aisle"].map(parent) == labeled["department"]).all()
    assert labeled["aisle"].tolist() == predictor.predict(names).labels
    entry = json.loads((tmp_path / "labeled" / "_manifest" / "catalog.parquet.json").read_text())
    assert entry["completion"] == "distinct_first" and entry["scorer"] == "first_token"


def test_csv_catalogs_bring_their_aisles(tmp_path):
    prepare(instacart_csvs(tmp_path, [(10, 1), (11, 2), (12, 2)]), tmp_path / "data")
    tree = json.loads((tmp_path / "data" / "taxonomy.json").read_text())
    assert tree["parent"]["aisle"] == {"baking": "pantry", "pizza": "frozen", "ice cream": "frozen"}
    with pytest.raises(DataError, match=r"aisle 'pizza' is under 2 departments \(frozen, pantry\)"):
        prepare(instacart_csvs(tmp_path, [(10, 1), (11, 2), (11, 1)]), tmp_path / "other")
