"""Side by side: the headline numbers and the claims of several analysis folders (`analyze report` outputs),
e.g. the quickstart against the scale run, or the same recipe with and without a tuned lens. The rows are
the typed results' own headlines (analyze.results: Result.headlines) and the claims table
(analyze.claims), so a comparison and a report never disagree on what a number means."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from analyze.claims import claims
from analyze.results import RESULT_TYPES, Analyses, format_value, load_analyses, to_jsonable
from harvest.atomic import atomic_write_json, atomic_write_text
from harvest.errors import UserError

COMPARE_FILES = ("compare.json", "compare.csv", "compare.md")


class CompareError(UserError):
    """The folders to compare hold no analyses."""


@dataclass
class Row:
    section: str  # a result KIND, or "claims"
    label: str
    values: list[Any]  # one per folder, None where absent


@dataclass
class CompareTable:
    labels: list[str]
    folders: list[str]
    rows: list[Row]  # headline numbers
    claims: list[Row]  # per claim: "ours (verdict)" per folder


def _folder_label(f: Path) -> str:
    return f.parent.name if f.name == "analysis" else f.name


def compare_folders(folders: Sequence[str | Path], labels: Sequence[str] | None = None) -> CompareTable:
    folders = [Path(f) for f in folders]
    labels = list(labels) if labels else [_folder_label(f) for f in folders]
    if len(labels) != len(folders):
        raise CompareError(f"{len(labels)} labels for {len(folders)} folders: pass one --label per folder")
    loaded: list[Analyses] = []
    for f in folders:
        if not f.is_dir():
            raise CompareError(f"{f} is not a folder: pass analysis folders written by `analyze report`")
        a = load_analyses(f)
        if not a.present():
            raise CompareError(
                f"{f} holds none of {', '.join(t.FILE for t in RESULT_TYPES)}: pass analysis folders written by "
                f"`analyze report` (or by the single analyses)"
            )
        loaded.append(a)
    rows = [Row("cache", "tuned lens", [a.lens() for a in loaded])]
    rows += _side_by_side(
        [[(r.KIND, h.label, h.value) for r in a.present() for h in r.headlines()] for a in loaded], len(folders)
    )
    claim_rows = _side_by_side(
        [[("claims", c.claim, f"{c.ours} [{c.verdict}]") for c in claims(a)] for a in loaded], len(folders)
    )
    return CompareTable(labels, [str(f) for f in folders], rows, claim_rows)


def _side_by_side(per_folder: list[list[tuple[str, str, Any]]], n: int) -> list[Row]:
    """Rows keyed by (section, label) in first-seen order, one value per folder."""
    index: dict[tuple[str, str], Row] = {}
    for i, items in enumerate(per_folder):
        for section, label, value in items:
            row = index.setdefault((section, label), Row(section, label, [None] * n))
            row.values[i] = value
    return list(index.values())


def format_compare(c: CompareTable) -> str:
    """Two Markdown tables: the headline numbers, then the claims (ours [verdict]) per folder."""

    def table(head: list[str], rows: list[list[str]], align: list[str]) -> list[str]:
        esc = lambda s: s.replace("|", "\\|")
        return [
            "| " + " | ".join(map(esc, head)) + " |",
            "|" + "|".join(align) + "|",
            *("| " + " | ".join(map(esc, r)) + " |" for r in rows),
        ]

    n = len(c.labels)
    lines = table(
        ["section", "number", *c.labels],
        [[r.section, r.label, *map(format_value, r.values)] for r in c.rows],
        ["---", "---"] + ["---:"] * n,
    )
    if c.claims:
        lines += [""] + table(
            ["claim", *c.labels], [[r.label, *map(format_value, r.values)] for r in c.claims], ["---"] * (n + 1)
        )
    return "\n".join(lines)


def _csv(c: CompareTable) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["section", "number", *c.labels])
    for r in [*c.rows, *c.claims]:
        w.writerow([r.section, r.label, *("" if v is None else v for v in r.values)])
    return buf.getvalue()


def run_compare(
    folders: Sequence[str | Path], labels: Sequence[str] | None = None, out_dir: str | Path | None = None
) -> tuple[CompareTable, list[Path]]:
    """Compare, and write compare.json, compare.csv and compare.md into out_dir (when given)."""
    result = compare_folders(folders, labels)
    files: list[Path] = []
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = [out / n for n in COMPARE_FILES]
        atomic_write_json(files[0], to_jsonable(result))
        atomic_write_text(files[1], _csv(result))
        atomic_write_text(files[2], format_compare(result) + "\n")
    return result, files
