"""A shop's own catalog, as it comes: one CSV or Parquet file, its columns mapped at the boundary.

A shop's export is rarely shaped like Instacart's files (``sku``, ``title``, ``category`` as
``department/aisle`` paths, a price). :func:`load_catalog` reads it with pyarrow and maps the
columns the recipe's data section names (``text_column``, ``label_column``, ``id_column``,
``path_separator``) onto the pipeline's own (``product_id``, ``product_name``, ``department``,
``aisle``), so that training, calibration and evaluation never see the shop's names; the shop's
ids keep their values and their type in ``product_id``, and :class:`ColumnMap` records which
column was used for what (``prepare.json``, the console).

Which column holds the labels, one rule (docs/your-catalog.md):

1. ``data.label_column`` (``--label-column``) where it is set;
2. else ``department`` where the catalog has one (``aisle`` beside it gives the aisles);
3. else ``category``.

A label is split at ``path_separator`` (``/`` by default): its first segment is the department,
the rest the aisle. Where no label of the column holds the separator, an ``aisle`` column gives
the aisles. Every column of the file that the rule did not use is named as not used, with the
flag that would use it.

Everything a user can fix is a one-line :class:`DataError` naming the file, the column and the
first offending rows, counted from 1 as a spreadsheet shows them (the header not counted).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pv
import pyarrow.parquet as pq

from pipeline.config import DataConfig
from pipeline.errors import DataError

log = logging.getLogger(__name__)

DEFAULT_SEPARATOR = "/"
DELIMITERS = (",", ";", "\t", "|")
"""What the header line is sniffed for when ``data.delimiter`` is unset."""
CSV_SUFFIXES = (".csv", ".tsv", ".txt")
PARQUET_SUFFIXES = (".parquet", ".pq")
PARQUET_MAGIC = b"PAR1"
SHOWN_ROWS = 5
"""Offending rows an error names at most."""
INT_ID = r"^(0|-?[1-9][0-9]{0,17})$"
"""A CSV id that reads back as the same text when stored as an int64 (no leading zero, no sign
on 0, under 10^18): only such id columns become integers; ``007`` stays a string."""


# --- reading ---------------------------------------------------------------------------------


def catalog_format(path: Path) -> str:
    """``csv`` or ``parquet``, from the file's first bytes and its suffix, so that a spreadsheet or
    a mislabelled file is named at once instead of being parsed into nonsense."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with open(path, "rb") as handle:
        head = handle.read(4096)
    suffix = path.suffix.lower()
    if head[:4] == PARQUET_MAGIC:
        return "parquet"
    if suffix in PARQUET_SUFFIXES:
        raise DataError(f"{path}: cannot be read as Parquet: the file does not start with Parquet's magic bytes")
    if suffix not in CSV_SUFFIXES:
        raise DataError(f"{path}: not a CSV or Parquet file (suffix {suffix or 'none'!r}): "
                        f"export the catalog as .csv or .parquet")
    if b"\x00" in head:
        raise DataError(f"{path}: cannot be read as CSV: the file holds binary data (NUL bytes), "
                        f"not text; export the catalog as .csv or .parquet")
    return "csv"


def sniff_delimiter(path: Path, encoding: str) -> str:
    """The candidate delimiter the header line holds most (``,`` on a tie or none; tab for .tsv):
    the ``;`` of a European spreadsheet export then just works."""
    with open(path, "rb") as handle:
        header = handle.readline(1 << 16).decode(encoding, errors="replace")
    counts = {d: header.count(d) for d in DELIMITERS}
    best = max(DELIMITERS, key=lambda d: counts[d])
    if counts[best] == 0 or counts[best] == counts[","]:
        return "\t" if path.suffix.lower() == ".tsv" and counts["\t"] else ","
    return best


def _shown(rows: list[int]) -> str:
    return ", ".join(map(str, rows[:SHOWN_ROWS])) + (", ..." if len(rows) > SHOWN_ROWS else "")


def first_rows(mask: Any) -> list[int]:
    """The rows (from 1) where ``mask`` holds: what an error names."""
    values = mask.to_pylist() if isinstance(mask, (pa.Array, pa.ChunkedArray)) else list(mask)
    return [i + 1 for i, v in enumerate(values) if v]


def _as_text(table: pa.Table, name: str, source: Path) -> pa.ChunkedArray:
    """A column as strings: bytes must be valid UTF-8 (named, with the rows, if not), numbers and
    categories are written as text (an int label ``3`` is the label ``"3"``)."""
    column = table.column(name)
    kind = column.type
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        try:
            return column.cast(pa.string())
        except pa.ArrowInvalid:
            bad = []
            for i, value in enumerate(column.to_pylist()):
                try:
                    if value is not None:
                        value.decode("utf-8")
                except UnicodeDecodeError:
                    bad.append(i + 1)
                    if len(bad) > SHOWN_ROWS:
                        break
            example = column[bad[0] - 1].as_py() if bad else b""
            raise DataError(f"{source}: column {name!r}: not valid UTF-8 in rows {_shown(bad)} (e.g. {example!r}); "
                            f"save the file as UTF-8, or name its encoding with --encoding (data.encoding), "
                            f"e.g. cp1252") from None
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
        return column.cast(pa.string())
    try:
        return column.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise DataError(f"{source}: column {name!r} is {kind}, which cannot be read as text") from None


def read_csv(path: Path, cfg: DataConfig, text_columns: set[str]) -> pa.Table:
    """The CSV with pyarrow: ``text_columns`` read as strings whatever they look like (an id
    ``007``, a department ``10``), every other column typed by pyarrow; a row with too many or too
    few fields, and bytes that are not text in the encoding, are errors naming their rows."""
    delimiter = cfg.delimiter or sniff_delimiter(path, cfg.encoding)
    invalid: list[Any] = []

    def skip_and_remember(row: Any) -> str:
        invalid.append(row)
        return "skip"

    try:
        table = pv.read_csv(
            path,
            read_options=pv.ReadOptions(encoding=cfg.encoding, use_threads=False),  # rows numbered
            parse_options=pv.ParseOptions(delimiter=delimiter, newlines_in_values=True,
                                          invalid_row_handler=skip_and_remember),
            convert_options=pv.ConvertOptions(column_types={c: pa.binary() for c in text_columns}))
    except (pa.ArrowInvalid, UnicodeDecodeError, LookupError, ValueError) as exc:
        raise DataError(f"{path}: cannot be read as CSV (delimiter {delimiter!r}, encoding {cfg.encoding!r}): "
                        f"{' '.join(str(exc).split())}") from None
    if invalid:
        row = invalid[0]
        rows = [r.number - 1 for r in invalid if r.number is not None]
        raise DataError(f"{path}: rows {_shown(rows)} have a different number of fields than the header "
                        f"({row.actual_columns} instead of {row.expected_columns}, delimiter {delimiter!r}): "
                        f"e.g. {row.text[:80]!r}; quote values that hold the delimiter, or set --delimiter")
    for name in table.column_names:  # any column pyarrow could only read as bytes is not text in the encoding
        if pa.types.is_binary(table.schema.field(name).type):
            table = table.set_column(table.schema.get_field_index(name), name, _as_text(table, name, path))
    return table


def read_parquet(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: cannot be read as Parquet: {' '.join(str(exc).split())}") from None


# --- the column map ----------------------------------------------------------------------------


@dataclass
class ColumnMap:
    """Which of the catalog's columns became what, and why: recorded in ``prepare.json``."""

    text: str
    label: str
    label_from: str
    """``data.label_column``, or the default rule's pick (``default: department``, ``default: category``)."""
    id: str | None
    """None: the catalog has no id column; ``product_id`` is then the row number, from 1."""
    separator: str
    aisle: str | None = None
    """The column the aisles come from where the labels hold no paths (``aisle``), else None."""
    levels: list[str] = field(default_factory=list)
    not_used: dict[str, str] = field(default_factory=dict)
    """Each column of the catalog that none of the above used, with what would use it."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def sentence(self, source: str) -> str:
        """One console line: what a user checks first when the model learns the wrong thing."""
        labels = f"labels from {self.label!r} ({self.label_from})"
        if "aisle" in self.levels:
            labels += (f", aisles from {self.aisle!r}" if self.aisle
                       else f", split at {self.separator!r} into department and aisle")
        ids = f"ids from {self.id!r}" if self.id else "no id column: product_id is the row number"
        unused = ("; not used: " + ", ".join(f"{c!r} ({why})" for c, why in self.not_used.items())
                  if self.not_used else "")
        return f"{source}: names from {self.text!r}, {labels}, {ids}{unused}"


def _missing(names: list[str], wanted: list[tuple[str, str]], source: Path) -> None:
    """One error for every column the mapping names that the file lacks, with the flags to fix it."""
    absent = [(column, flag) for column, flag in wanted if column not in names]
    if absent:
        hint = ""
        if len(names) == 1 and any(d in names[0] for d in DELIMITERS):
            hint = " (one column: is the delimiter right? --delimiter)"
        raise DataError(f"{source}: missing column(s) {', '.join(c for c, _ in absent)} "
                        f"(has: {', '.join(names)}){hint}; name yours with "
                        f"{', '.join(dict.fromkeys(f for _, f in absent))}")


def resolve_columns(names: list[str], cfg: DataConfig, source: Path) -> ColumnMap:
    """Apply the recipe's column names, or the documented defaults, to the file's columns."""
    text = cfg.text_column or "product_name"
    if cfg.label_column:
        label, label_from = cfg.label_column, "data.label_column"
    elif "department" in names:
        label, label_from = "department", "default: department"
    elif "category" in names:
        label, label_from = "category", "default: category"
    else:
        label, label_from = "department", "default: department"
    wanted = [(text, "--text-column"), (label, "--label-column")]
    if cfg.id_column:
        wanted.append((cfg.id_column, "--id-column"))
    _missing(names, wanted, source)
    id_column = cfg.id_column or ("product_id" if "product_id" in names else None)
    separator = DEFAULT_SEPARATOR if cfg.path_separator is None else cfg.path_separator
    return ColumnMap(text=text, label=label, label_from=label_from, id=id_column, separator=separator)


def _not_used(names: list[str], columns: ColumnMap) -> dict[str, str]:
    used = {columns.text, columns.label, columns.id, columns.aisle}
    why = {}
    for name in names:
        if name in used:
            continue
        if name in ("department", "category"):
            why[name] = f"--label-column {name} to take the labels from it"
        elif name == "aisle":
            why[name] = f"the aisles come from the label paths in {columns.label!r}"
        elif name in ("product_name",):
            why[name] = f"--text-column {name} to read names from it"
        elif name in ("product_id",):
            why[name] = f"--id-column {name} to keep it as the id"
        else:
            why[name] = "kept in to_label.parquet"
    return why


# --- the table -------------------------------------------------------------------------------


def _labels(values: pd.Series) -> pd.Series:
    """Labels stripped of surrounding spaces; empty ones are no label (the row goes to
    to_label.parquet)."""
    stripped = values.astype("string").str.strip()
    return stripped.mask(stripped == "")


def split_paths(labels: pd.Series, columns: ColumnMap, source: Path) -> tuple[pd.Series, pd.Series]:
    """(department, aisle) of each label path: the first segment, and the rest joined again; a path
    with an empty segment (``pantry/``, ``/baking``, ``a//b``) is an error naming its rows."""
    segments = labels.str.split(columns.separator, regex=False)
    empty = segments.map(lambda parts: isinstance(parts, list) and any(not p.strip() for p in parts))
    if empty.any():
        rows = [i + 1 for i in labels.index[empty.to_numpy(dtype=bool)]]
        raise DataError(f"{source}: column {columns.label!r}: a label path with an empty segment in rows "
                        f"{_shown(rows)} (e.g. {labels.loc[rows[0] - 1]!r}); give every level a name, or "
                        f"--path-separator '' to read each label whole")
    department = segments.map(lambda parts: parts[0].strip() if isinstance(parts, list) else pd.NA)
    aisle = segments.map(lambda parts: columns.separator.join(p.strip() for p in parts[1:])
                         if isinstance(parts, list) and len(parts) > 1 else pd.NA)
    return department.astype("string"), aisle.astype("string")


def _ids(table: pa.Table, columns: ColumnMap, source: Path, csv: bool) -> pa.ChunkedArray:
    """The catalog's ids, checked: none missing, none repeated (a repeated SKU would make the
    predictions untraceable). A CSV's id column becomes int64 where every id is a plain integer."""
    if columns.id is None:
        return pa.chunked_array([pa.array(range(1, table.num_rows + 1), pa.int64())])
    ids = table.column(columns.id)
    if csv:
        ids = _as_text(table, columns.id, source)
        ids = pc.if_else(pc.equal(pc.utf8_trim_whitespace(ids), ""), pa.scalar(None, pa.string()), ids)
    null = first_rows(pc.is_null(ids))
    if null:
        raise DataError(f"{source}: column {columns.id!r}: no id in rows {_shown(null)}; give every product "
                        f"an id, or leave --id-column unset to number the rows")
    if csv and pc.all(pc.match_substring_regex(ids, INT_ID)).as_py():
        ids = ids.cast(pa.int64())
    values = ids.to_pylist()
    counts = pd.Series(values).value_counts()
    repeated = set(counts.index[counts > 1])
    if repeated:
        rows = [i + 1 for i, v in enumerate(values) if v in repeated]
        first = values[rows[0] - 1]
        raise DataError(f"{source}: column {columns.id!r}: {len(rows)} rows share {len(repeated)} id(s), "
                        f"rows {_shown(rows)} (e.g. {first!r} in rows "
                        f"{_shown([i + 1 for i, v in enumerate(values) if v == first])}); ids must be unique")
    return ids


@dataclass
class Catalog:
    """A catalog read and mapped: the pipeline's table, the file's own rows, and the map."""

    table: pd.DataFrame
    """``product_id``, ``product_name``, ``department``, ``aisle`` (+ Instacart's empty id columns),
    and ``_row``: the file's row, from 1, for error messages and to_label.parquet."""
    raw: pa.Table
    """The file's rows with their own columns (text columns decoded, a CSV's ids typed)."""
    columns: ColumnMap
    format: str


def load_catalog(cfg: DataConfig) -> Catalog:
    """Read ``data.catalog`` (CSV or Parquet) and map its columns; every check that needs only the
    file runs here, before anything is written."""
    if not cfg.catalog:
        raise DataError("data.source=catalog needs data.catalog (--catalog)")
    path = Path(cfg.catalog)
    kind = catalog_format(path)
    if kind == "csv":
        text_like = {cfg.text_column or "product_name", cfg.label_column or "department", "category", "aisle",
                     cfg.id_column or "product_id"}
        raw = read_csv(path, cfg, text_like)
    else:
        raw = read_parquet(path)
    columns = resolve_columns(raw.column_names, cfg, path)

    text_type = raw.schema.field(columns.text).type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        # the labeler reads names as text only: a catalog it could not label is refused here
        raise DataError(f"{path}: column {columns.text!r} is {text_type}, not text: name the product-name "
                        f"column with --text-column")
    names = raw.column(columns.text).cast(pa.string())
    ids = _ids(raw, columns, path, kind == "csv")
    if columns.id is not None:
        raw = raw.set_column(raw.schema.get_field_index(columns.id), columns.id, ids)
    labels = _labels(_as_text(raw, columns.label, path).to_pandas())
    if labels.isna().all():
        raise DataError(f"{path}: column {columns.label!r}: no labels, every one of its {len(labels)} rows is "
                        f"empty; name the label column with --label-column")
    has_paths = bool(columns.separator) and bool(labels.str.contains(columns.separator, regex=False).any())
    if has_paths:
        department, aisle = split_paths(labels, columns, path)
    else:
        department = labels
        columns.aisle = "aisle" if "aisle" in raw.column_names and columns.label != "aisle" else None
        aisle = _labels(_as_text(raw, "aisle", path).to_pandas()) if columns.aisle else pd.Series(
            pd.NA, index=labels.index, dtype="string")
    columns.levels = ["department", "aisle"] if aisle.notna().any() else ["department"]
    columns.not_used = _not_used(raw.column_names, columns)

    table = pd.DataFrame({
        "product_id": ids.to_pandas(),
        "product_name": names.to_pandas(),
        "aisle_id": pd.NA,
        "department_id": pd.NA,
        "department": department.astype(object).where(department.notna(), None),
        "aisle": aisle.astype(object).where(aisle.notna(), None),
        "_row": range(1, raw.num_rows + 1),
    })
    return Catalog(table, raw, columns, kind)
