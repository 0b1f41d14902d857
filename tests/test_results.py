"""Results index: every committed result JSON says how it was made and is explained in results/README.md.

Each ``results/**/*.json`` must record the exact ``command`` that wrote it, the fully resolved
recipe (``config``, as ``Recipe.to_dict()`` gives it) and the ``machine`` it ran on. Older files
had fields added afterwards; they say so, and from what source, in a ``backfilled`` note.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

RESULTS = Path(__file__).resolve().parents[1] / "results"
FILES = sorted(RESULTS.rglob("*.json"))
SECTIONS = ("data", "model", "lora", "train", "eval")
MACHINE_FIELDS: dict[str, type] = {"cpu": str, "cpu_native_bf16": bool, "cpu_flags": list, "torch_threads": int}


def rel(path: Path) -> str:
    return path.relative_to(RESULTS).as_posix()


def problems(result: dict[str, Any]) -> list[str]:
    """What a result lacks, as dotted field names with what each should be (empty if nothing)."""
    found = []
    command = result.get("command")
    if not (isinstance(command, str) and command.strip()):
        found.append("command (a non-empty string)")
    config = result.get("config")
    if not isinstance(config, dict):
        found.append("config (the resolved recipe, a dict)")
    else:
        found += [f"config.{s} (a dict)" for s in SECTIONS if not isinstance(config.get(s), dict)]
    machine = result.get("machine")
    if not isinstance(machine, dict):
        found.append("machine (a dict)")
    else:
        for name, kind in MACHINE_FIELDS.items():
            value = machine.get(name)
            # bool is an int subclass: torch_threads=True is not a thread count.
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                found.append(f"machine.{name} ({kind.__name__})")
    if "backfilled" in result and not (isinstance(result["backfilled"], str) and result["backfilled"].strip()):
        found.append("backfilled (a non-empty string when present)")
    return found


def mentioned(name: str, text: str) -> bool:
    """``name`` occurs in ``text`` not as the tail of a longer name (lora-full.json in errors-lora-full.json)."""
    start = text.find(name)
    while start >= 0:
        if start == 0 or not (text[start - 1].isalnum() or text[start - 1] in "-_"):
            return True
        start = text.find(name, start + 1)
    return False


def test_there_are_results():
    assert FILES, f"no JSON under {RESULTS}"


@pytest.mark.parametrize("path", FILES, ids=rel)
def test_result_records_command_config_and_machine(path: Path):
    result = json.loads(path.read_text())
    assert isinstance(result, dict), f"results/{rel(path)}: not a JSON object"
    missing = problems(result)
    assert not missing, f"results/{rel(path)} lacks: {', '.join(missing)}"


@pytest.mark.parametrize("path", FILES, ids=rel)
def test_result_is_explained_in_the_readme(path: Path):
    readme = (RESULTS / "README.md").read_text()
    name, folder = rel(path), path.parent.relative_to(RESULTS).as_posix()
    assert mentioned(name, readme) or (folder != "." and mentioned(f"{folder}/", readme)), (
        f"results/{name} is not mentioned in results/README.md (by its path or its folder {folder}/)")
