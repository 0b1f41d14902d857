import json
import subprocess
import sys

import pandas as pd
import pytest

from pipeline.config import DataConfig
from pipeline.data import (
    DataError,
    embedded_catalog,
    format_completion,
    format_prompt,
    ids_fingerprint,
    join_products,
    prepare,
    read_split,
    split,
)

# sha256 of the comma-joined test product_ids, in split order; pins the split across library versions.
TEST_IDS_SHA256 = {
    "product_id": "6ddac54b2d2c63e73ac9515e034daf6eb1a9756c36879cec9e4d30823a2e8888",
    "tutorial": "5cf6c809b58df41734bf230d1f8e6eccb4071b79afeaf9a71e68e4514434608b",
}


@pytest.fixture(scope="module")
def instacart():
    products, departments, source = embedded_catalog()
    return products, departments, source


@pytest.mark.parametrize("order", ["product_id", "tutorial"])
def test_join_and_split_match_the_tutorial(instacart, order):
    table, drops = join_products(*instacart, order=order)
    assert len(table) == 49_688 and drops == {}
    assert table["department"].nunique() == 21
    train, test = split(table, 0.2, 42)
    assert (len(train), len(test)) == (39_750, 9_938)
    assert ids_fingerprint(test["product_id"]) == TEST_IDS_SHA256[order]
    assert set(train["product_id"]).isdisjoint(test["product_id"])


def test_tutorial_order_gives_the_tutorials_published_test_rows(instacart):
    table, _ = join_products(*instacart, order="tutorial")
    _, test = split(table, 0.2, 42)
    assert test["product_name"].head(3).tolist() == [
        "Free & Clear Stage 4 Overnight Diapers",
        "Beef pot roast with roasted potatoes, carrots, sweet onions, green beans, and a rich gravy Beef Pot Roast",
        "Coffee Liquer",
    ]


def test_prepare_holds_missing_out_and_writes_it_to_label(data_dir):
    summary = json.loads((data_dir / "prepare.json").read_text())
    assert summary["split"] == {"train": 39_750, "test": 9_938}
    assert summary["held_out_unlabelled"] == {"train": 979, "test": 279}
    assert summary["written"] == {"train": 36_832, "validation": 1_939, "test": 9_659, "to_label": 1_258}
    labels = json.loads((data_dir / "labels.json").read_text())
    assert len(labels) == 20 and "missing" not in labels and labels == sorted(labels)
    to_label = pd.read_parquet(data_dir / "to_label.parquet")
    assert len(to_label) == 1_258 and "department" not in to_label.columns
    assert len(read_split(data_dir / "test.parquet", labels)) == 9_659


def test_keep_missing_keeps_all_rows(tmp_path):
    summary = prepare(DataConfig(keep_missing=True, validation_size=0), tmp_path)
    assert summary["written"] == {"train": 39_750, "validation": 0, "test": 9_938, "to_label": 0}
    assert summary["labels"] == 21


def test_validation_is_carved_from_train_stratified_and_stable(data_dir, tmp_path):
    """Choices made after training see validation rows only: disjoint from train and test, the test
    split still exactly the tutorial's, the same rows on every prepare."""
    train, validation, test = (pd.read_parquet(data_dir / f"{p}.parquet") for p in ("train", "validation", "test"))
    ids = [set(frame["product_id"]) for frame in (train, validation, test)]
    assert ids[0].isdisjoint(ids[1]) and ids[1].isdisjoint(ids[2]) and ids[0].isdisjoint(ids[2])
    summary = json.loads((data_dir / "prepare.json").read_text())
    assert summary["test_ids_sha256"] != summary["validation"]["ids_sha256"]
    _, tutorial_test = split(join_products(*embedded_catalog()[:2], embedded_catalog()[2])[0], 0.2, 42)
    assert ids_fingerprint(tutorial_test["product_id"]) == TEST_IDS_SHA256["product_id"] == summary["test_ids_sha256"]
    assert summary["validation"]["stratified"] is True
    shares = pd.concat({"train": train["department"].value_counts(normalize=True),
                        "validation": validation["department"].value_counts(normalize=True)}, axis=1)
    assert (shares["train"] - shares["validation"]).abs().max() < 0.002  # every department in proportion
    again = prepare(DataConfig(), tmp_path)
    assert again["validation"]["ids_sha256"] == summary["validation"]["ids_sha256"]
    assert pd.read_parquet(tmp_path / "validation.parquet").equals(validation)


def test_prompt_format():
    assert format_prompt("Bread Rolls") == "Bread Rolls ->:"
    assert format_prompt("  Milk\n2%\t ") == "Milk 2% ->:"
    assert format_completion("bakery") == " bakery"


# --- bad inputs ------------------------------------------------------------------------------

def _write_csvs(tmp_path, products, departments):
    p, d = tmp_path / "products.csv", tmp_path / "departments.csv"
    pd.DataFrame(products).to_csv(p, index=False)
    pd.DataFrame(departments).to_csv(d, index=False)
    return DataConfig(source="csv", products=str(p), departments=str(d))


DEPTS = {"department_id": [1, 2, 3], "department": ["bakery", "dairy eggs", "frozen"]}


def _products(n=10, **overrides):
    rows = {"product_id": list(range(1, n + 1)), "product_name": [f"Product {i}" for i in range(n)],
            "aisle_id": [1] * n, "department_id": [1 + i % 3 for i in range(n)]}
    rows.update(overrides)
    return rows


def test_csv_catalog_prepares(tmp_path):
    summary = prepare(_write_csvs(tmp_path, _products(), DEPTS), tmp_path / "out")
    assert summary["split"] == {"train": 8, "test": 2} and summary["dropped"] == {}


def test_unknown_departments_and_empty_names_are_counted_drops(tmp_path):
    products = _products(department_id=[1, 2, 3, 9, 9, 1, 2, 3, 1, 2],
                         product_name=["a", "b", "", "d", "e", None, "g", "h", "i", "j"])
    summary = prepare(_write_csvs(tmp_path, products, DEPTS), tmp_path / "out")
    assert summary["dropped"]["unknown_department_id"] == {"rows": 2, "example_product_ids": [4, 5]}
    assert summary["dropped"]["empty_product_name"]["rows"] == 2
    assert summary["rows_joined"] == 6 == summary["split"]["train"] + summary["split"]["test"]


@pytest.mark.parametrize("products, departments, message", [
    (_products(product_id=[1, 2, 3, 3, 5, 6, 7, 8, 9, 10]), DEPTS,
     r"products.csv.*2 rows share duplicate product_id values \(e.g. 3\)"),
    ({"product_id": [1], "name": ["x"], "department_id": [1]}, DEPTS,
     r"products.csv: missing column\(s\) product_name"),
    (_products(), {"department_id": [1, 2], "dept": ["a", "b"]}, r"departments.csv: missing column\(s\) department"),
    (_products(), {"department_id": [1, 1, 2], "department": ["a", "b", "c"]}, "duplicate department_id"),
])
def test_bad_csv_inputs_raise_naming_the_file(tmp_path, products, departments, message):
    with pytest.raises(DataError, match=message):
        prepare(_write_csvs(tmp_path, products, departments), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope.csv: file not found"):
        prepare(DataConfig(source="csv", products=str(tmp_path / "nope.csv"), departments="x"), tmp_path / "out")


def test_parquet_catalog(tmp_path):
    path = tmp_path / "catalog.parquet"
    pd.DataFrame({"product_name": [f"p{i}" for i in range(20)],
                  "department": ["a", "b", None, "missing"] * 5}).to_parquet(path)
    summary = prepare(DataConfig(source="parquet", catalog=str(path)), tmp_path / "out")
    assert summary["written"]["to_label"] == 10
    assert summary["labels"] == 2
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    with pytest.raises(DataError, match="bad.parquet: cannot be read as Parquet"):
        prepare(DataConfig(source="parquet", catalog=str(bad)), tmp_path / "out2")
    pd.DataFrame({"name": ["x"]}).to_parquet(bad)
    with pytest.raises(DataError, match=r"bad.parquet: missing column\(s\) product_name, department"):
        prepare(DataConfig(source="parquet", catalog=str(bad)), tmp_path / "out2")


def test_cli_reports_bad_input_on_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pipeline", "prepare", "--catalog", str(tmp_path / "x.parquet"),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 2
    expected = f"catalog-tuner prepare: error: {tmp_path / 'x.parquet'}: file not found"
    assert result.stderr.strip().splitlines() == [expected]
