"""The benchmark helpers (the benchmarks themselves print numbers; nothing is timed here)."""

import pyarrow.parquet as pq

from pipeline.bench import parse_generation, synthetic_catalog

LABELS = ["dairy eggs", "frozen", "snacks", "pets"]


def test_parse_generation_takes_the_first_label_after_the_prompt():
    prompt = "Frozen Peas ->:"
    assert parse_generation(prompt + " frozen<|im_end|>", prompt, LABELS) == "frozen"
    assert parse_generation(prompt + " Department - Snacks, or frozen", prompt, LABELS) == "snacks"
    assert parse_generation(prompt + " everybody is happy!", prompt, LABELS) is None


def test_synthetic_catalog_prelabels_all_but_the_new_fraction(data_dir, tmp_path):
    path = tmp_path / "catalog.parquet"
    synthetic_catalog(data_dir, 70_000, 0.01, "demo@0123456789ab", path)
    table = pq.read_table(path)
    assert table.num_rows == 70_000 and pq.ParquetFile(path).metadata.num_row_groups == 2
    new = table.column("department").null_count
    assert 0.005 < new / 70_000 < 0.02
    assert table.column("labeled_by").null_count == new
