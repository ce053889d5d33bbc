"""Side by side: the headline numbers of several analysis folders (`analyze report` outputs), e.g. the same
SAE recipe with and without a tuned lens, or the runs of a sweep. The numbers are the report's headlines
(analyze.report.HEADLINES), so a comparison and a report never disagree on what a number means."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Sequence

from harvest.errors import UserError

from .report import KNOWN, collect_sections, headlines

COMPARE_FILES = ("compare.json", "compare.csv", "compare.md")


class CompareError(UserError):
    """The folders to compare hold no analyses."""


def _lens_of(sections: dict[str, dict[str, Any]]) -> str:
    """The tuned lens the analysed vectors went through: recorded in the JSON, else in the cache it names."""
    datas = [d for d in ((sections.get(n) or {}).get("data") for n in KNOWN) if isinstance(d, dict)]
    lens: Any = next((d["lens"] for d in datas if "lens" in d), "unknown")
    if lens == "unknown":
        from harvest import open_cache

        for path in [d["cache"] for d in datas if isinstance(d.get("cache"), str)]:
            try:
                lens = open_cache(path).lens_record
                break
            except UserError:  # moved or deleted since
                continue
    return "none" if lens is None else str(lens.get("source", "?")) if isinstance(lens, dict) else str(lens)


def compare_folders(folders: Sequence[str | Path], labels: Sequence[str] | None = None) -> dict[str, Any]:
    """{"labels", "folders", "rows": [{"section", "label", "values": [one per folder, None where absent]}]}."""
    folders = [Path(f) for f in folders]
    labels = list(labels) if labels else [f.parent.name if f.name == "analysis" else f.name for f in folders]
    if len(labels) != len(folders):
        raise CompareError(f"{len(labels)} labels for {len(folders)} folders: pass one --label per folder")
    per_folder = []
    for f in folders:
        if not f.is_dir():
            raise CompareError(f"{f} is not a folder: pass analysis folders written by `analyze report`")
        sections = collect_sections(f)
        if not any(name in sections for name in KNOWN):
            raise CompareError(
                f"{f} holds none of {', '.join(v[0] for v in KNOWN.values())}: pass analysis folders "
                f"written by `analyze report` (or the single analyses)"
            )
        per_folder.append(sections)
    rows: list[dict[str, Any]] = [
        {"section": "cache", "label": "tuned lens", "values": [_lens_of(s) for s in per_folder]}
    ]
    index: dict[tuple[str, str], int] = {}
    for i, sections in enumerate(per_folder):
        for name in KNOWN:
            data = (sections.get(name) or {}).get("data")
            for label, _, value in headlines(name, data) if isinstance(data, dict) else []:
                key = (name, label)
                if key not in index:
                    index[key] = len(rows)
                    rows.append({"section": name, "label": label, "values": [None] * len(folders)})
                rows[index[key]]["values"][i] = value
    return {"labels": labels, "folders": [str(f) for f in folders], "rows": rows}


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def format_compare(result: dict[str, Any]) -> str:
    """A Markdown table: one row per headline number, one column per folder."""
    head = ["section", "number", *result["labels"]]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---", "---"] + ["---:"] * len(result["labels"])) + "|"]
    lines += ["| " + " | ".join([r["section"], r["label"], *map(_fmt, r["values"])]) + " |" for r in result["rows"]]
    return "\n".join(lines)


def run_compare(
    folders: Sequence[str | Path], labels: Sequence[str] | None = None, out_dir: str | Path | None = None
) -> dict[str, Any]:
    """Compare, and write compare.json, compare.csv and compare.md into out_dir (when given)."""
    result = compare_folders(folders, labels)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.json").write_text(json.dumps(result, indent=1))
        with open(out / "compare.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["section", "number", *result["labels"]])
            w.writerows(
                [r["section"], r["label"], *("" if v is None else v for v in r["values"])] for r in result["rows"]
            )
        (out / "compare.md").write_text(format_compare(result) + "\n")
        result["files"] = [str(out / n) for n in COMPARE_FILES]
    return result
