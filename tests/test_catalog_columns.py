"""A shop's own catalog, as it comes (#37): its column names, its ids, CSV or Parquet, and a
one-line error naming the file, the column and the rows for everything a user can fix."""

import json
import logging
import subprocess
import sys
from dataclasses import replace

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import DataConfig, load_recipe, save_recipe
from pipeline.data import adopt_prepared_columns, prepare, read_labels, read_split
from pipeline.errors import DataError

SPLITS = ("train", "validation", "test")


def shop_rows(n: int = 24) -> dict[str, list]:
    """A shop's export: SKUs, titles, department/aisle paths, a price; row 4 has no name, row 7 only
    spaces, row 10 no category."""
    paths = ["bakery/bread", "bakery/pastry", "dairy/milk", "dairy/cheese"]
    rows = {"sku": [f"SKU-{i:03d}" for i in range(1, n + 1)],
            "title": [f"product {i}" for i in range(1, n + 1)],
            "category": [paths[i % 4] for i in range(n)],
            "price": [round(1 + i / 10, 2) for i in range(n)]}
    rows["title"][3], rows["title"][6], rows["category"][9] = "", "  ", ""
    return rows


def write_csv(path, rows: dict[str, list], delimiter: str = ",") -> str:
    frame = pd.DataFrame(rows)
    frame.to_csv(path, sep=delimiter, index=False)
    return str(path)


SHOP = {"text_column": "title", "label_column": "category", "id_column": "sku"}


def prepared(out) -> dict[str, pd.DataFrame]:
    return {split: pd.read_parquet(out / f"{split}.parquet") for split in (*SPLITS, "to_label")}


def test_a_shops_csv_export_keeps_its_skus_and_says_which_columns_it_used(tmp_path):
    catalog = write_csv(tmp_path / "shop.csv", shop_rows())
    summary = prepare(DataConfig(source="catalog", catalog=catalog, validation_size=0.2, **SHOP), tmp_path / "data")
    frames = prepared(tmp_path / "data")

    labelled = {f"SKU-{i:03d}" for i in range(1, 25)} - {"SKU-004", "SKU-007", "SKU-010"}
    ids = [i for split in SPLITS for i in frames[split]["product_id"]]
    assert sorted(ids) == sorted(labelled)  # every labelled SKU once, as the shop wrote it
    test = read_split(tmp_path / "data" / "test.parquet", read_labels(tmp_path / "data" / "labels.json"))
    assert set(test["product_id"]) <= labelled  # what evaluate's predictions_test.parquet carries
    # rows without a label: the shop's own columns, as they came, for `label` to read like its next export
    assert frames["to_label"].to_dict("records") == [{"sku": "SKU-010", "title": "product 10", "category": "",
                                                      "price": 1.9}]
    assert summary["dropped"]["empty_product_name"] == {"rows": 2, "example_product_ids": ["SKU-004", "SKU-007"],
                                                         "example_rows": [4, 7]}
    columns = json.loads((tmp_path / "data" / "prepare.json").read_text())["columns"]
    assert (columns["text"], columns["label"], columns["id"], columns["levels"]) == (
        "title", "category", "sku", ["department", "aisle"])
    assert list(columns["not_used"]) == ["price"]
    tree = json.loads((tmp_path / "data" / "taxonomy.json").read_text())
    assert tree["parent"]["aisle"] == {"bread": "bakery", "pastry": "bakery", "milk": "dairy", "cheese": "dairy"}


def test_csv_and_parquet_catalogs_give_the_same_splits_and_int_ids_stay_ints(tmp_path):
    rows = shop_rows()
    rows["sku"] = [1000 + i for i in range(len(rows["sku"]))]
    write_csv(tmp_path / "shop.csv", rows, delimiter=";")  # sniffed: no --delimiter
    pq.write_table(pa.table(rows), tmp_path / "shop.parquet")
    for name in ("shop.csv", "shop.parquet"):
        prepare(DataConfig(source="catalog", catalog=str(tmp_path / name), **SHOP), tmp_path / name.replace(".", "_"))
    csv, parquet = prepared(tmp_path / "shop_csv"), prepared(tmp_path / "shop_parquet")
    for split in SPLITS:
        pd.testing.assert_frame_equal(csv[split], parquet[split])
        assert csv[split]["product_id"].dtype == "int64"
    assert csv["to_label"]["sku"].tolist() == [1009]


def test_csv_ids_that_would_not_survive_as_numbers_stay_text(tmp_path):
    rows = shop_rows()
    rows["sku"] = [f"{i:05d}" for i in range(len(rows["sku"]))]  # leading zeros
    catalog = write_csv(tmp_path / "shop.csv", rows, delimiter="\t")
    prepare(DataConfig(source="catalog", catalog=catalog, delimiter="\t", **SHOP), tmp_path / "data")
    ids = pd.concat(prepared(tmp_path / "data")[split] for split in SPLITS)["product_id"]
    assert "00000" in set(ids) and all(isinstance(i, str) and len(i) == 5 for i in ids)


def test_a_department_column_beats_category_paths_and_prepare_says_so(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.data")
    rows = shop_rows()
    rows["department"] = ["dept " + path.split("/")[0] if path else None for path in rows["category"]]
    catalog = write_csv(tmp_path / "shop.csv", rows)
    by_default = prepare(DataConfig(source="catalog", catalog=catalog, text_column="title", id_column="sku"),
                         tmp_path / "default")
    assert by_default["columns"]["label"] == "department" and by_default["aisles"] == 0
    assert "--label-column category" in by_default["columns"]["not_used"]["category"]
    assert "not used: 'category'" in caplog.text
    chosen = prepare(DataConfig(source="catalog", catalog=catalog, **SHOP), tmp_path / "chosen")
    assert chosen["columns"]["label"] == "category" and chosen["aisles"] == 4
    assert "department" in chosen["columns"]["not_used"]
    assert read_labels(tmp_path / "chosen" / "labels.json") == ["bakery", "dairy"]


def test_a_separator_of_nothing_reads_each_label_whole(tmp_path):
    catalog = write_csv(tmp_path / "shop.csv", shop_rows())
    summary = prepare(DataConfig(source="catalog", catalog=catalog, path_separator="", **SHOP), tmp_path / "data")
    assert summary["aisles"] == 0
    assert read_labels(tmp_path / "data" / "labels.json") == ["bakery/bread", "bakery/pastry", "dairy/cheese",
                                                              "dairy/milk"]


def _shop(tmp_path, **changes):
    rows = shop_rows()
    for column, edits in changes.items():
        if isinstance(edits, dict):
            for row, value in edits.items():  # rows from 1, as the errors count them
                rows[column][row - 1] = value
        else:
            rows[column] = edits
    return write_csv(tmp_path / "shop.csv", rows)


def _bytes(tmp_path, name: str, content: bytes):
    (tmp_path / name).write_bytes(content)
    return str(tmp_path / name)


BAD = {
    "misnamed column": (lambda t: _shop(t), {"text_column": "titel"},
                        r"shop.csv: missing column\(s\) titel \(has: sku, title, category, price\); "
                        r"name yours with --text-column"),
    "no label column": (lambda t: write_csv(t / "shop.csv", {k: v for k, v in shop_rows().items() if k != "category"}),
                        {"label_column": None},
                        r"shop.csv: missing column\(s\) department \(has: sku, title, price\); name yours with "
                        r"--label-column"),
    "labels all null": (lambda t: _shop(t, category=[None] * 24), {},
                        r"shop.csv: column 'category': no labels, every one of its 24 rows is empty"),
    "empty segment": (lambda t: _shop(t, category={3: "dairy/", 5: "/bread"}), {},
                      r"shop.csv: column 'category': a label path with an empty segment in rows 3, 5 "
                      r"\(e.g. 'dairy/'\)"),
    "leaf under two parents": (lambda t: _shop(t, category={2: "dairy/bread"}), {},
                               r"shop.csv: column 'category': aisle 'bread' is under 2 departments "
                               r"\(bakery, dairy\); e.g. product_id \['SKU-001', 'SKU-002'.*\] in rows \[1, 2,"),
    "duplicate ids": (lambda t: _shop(t, sku={2: "SKU-005"}), {},
                      r"shop.csv: column 'sku': 2 rows share 1 id\(s\), rows 2, 5 \(e.g. 'SKU-005'"),
    "missing ids": (lambda t: _shop(t, sku={3: ""}), {}, r"shop.csv: column 'sku': no id in rows 3;"),
    "not utf-8": (lambda t: _bytes(t, "shop.csv", b"sku,title,category\n1,Bread,bakery/bread\n2,Caf\xe9,x/y\n"),
                  {}, r"shop.csv: column 'title': not valid UTF-8 in rows 2 .*--encoding"),
    "ragged row": (lambda t: _bytes(t, "shop.csv", b"sku,title,category\n1,a,x/y\n2,b,x/y,9\n3,c,x/z\n"), {},
                   r"shop.csv: rows 2 have a different number of fields than the header \(4 instead of 3"),
    "a spreadsheet": (lambda t: _bytes(t, "shop.xlsx", b"PK\x03\x04 a zip"), {},
                      r"shop.xlsx: not a CSV or Parquet file \(suffix '.xlsx'\)"),
    "not parquet": (lambda t: _bytes(t, "shop.parquet", b"sku,title\n"), {},
                    r"shop.parquet: cannot be read as Parquet"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_catalogs_are_one_line_errors_and_leave_data_dir_as_it_was(tmp_path, case):
    make, columns, message = BAD[case]
    data = tmp_path / "data"
    prepare(DataConfig(source="catalog", catalog=_shop(tmp_path), **SHOP), data)  # a DATA_DIR from before
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    cfg = DataConfig(source="catalog", catalog=make(tmp_path), **{**SHOP, **columns})
    with pytest.raises(DataError, match=message) as raised:
        prepare(cfg, data)
    assert "\n" not in str(raised.value)
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before


def test_the_command_line_maps_columns_and_exits_2_on_bad_input(tmp_path):
    catalog = _shop(tmp_path, category={3: "dairy/"})
    command = [sys.executable, "-m", "pipeline", "prepare", "--catalog", catalog, "--text-column", "title",
               "--label-column", "category", "--id-column", "sku", "--out", str(tmp_path / "data")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 2 and not (tmp_path / "data").exists()
    assert result.stderr.strip().splitlines() == [
        f"catalog-tuner prepare: error: {catalog}: column 'category': a label path with an empty segment in rows 3 "
        f"(e.g. 'dairy/'); give every level a name, or --path-separator '' to read each label whole"]
    _shop(tmp_path)
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "names from 'title', labels from 'category'" in result.stderr and "ids from 'sku'" in result.stderr
    assert json.loads(result.stdout)["columns"]["id"] == "sku"


def test_a_run_remembers_the_columns_its_data_was_prepared_with(tmp_path):
    """``train`` adopts DATA_DIR's column names into the run's config.yaml (``adopt_prepared_columns``);
    the labeler reads catalogs by them unless told otherwise. No model is trained."""
    from pipeline.label import catalog_columns
    from pipeline.predict import run_recipe

    prepare(DataConfig(source="catalog", catalog=_shop(tmp_path), **SHOP), tmp_path / "data")
    recipe = load_recipe(None, [f"data.dir={tmp_path / 'data'}"])
    assert recipe.data.text_column is None
    run = tmp_path / "run"
    run.mkdir()
    save_recipe(replace(recipe, data=adopt_prepared_columns(recipe.data)), run / "config.yaml")
    assert catalog_columns(run_recipe(run).data) == ("title", "sku")
    assert catalog_columns(run_recipe(run).data, "name", "code") == ("name", "code")
    # a recipe naming its own columns keeps them (train then refuses the DATA_DIR as prepared otherwise)
    assert adopt_prepared_columns(replace(recipe.data, text_column="name")).text_column == "name"
    instacart = tmp_path / "instacart"
    instacart.mkdir()
    save_recipe(load_recipe(None, [f"data.dir={tmp_path / 'nowhere'}"]), instacart / "config.yaml")
    assert catalog_columns(run_recipe(instacart).data) == ("product_name", "product_id")
