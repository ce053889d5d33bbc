"""Shared test helpers: run the CLI in-process, read a whole cache back, reference activations."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from harvest.cache import Cache


def run_cli(argv: list, capsys, prog: str = "harvest") -> tuple[int, str, str]:
    """Run `PROG ARGV` (harvest or analyze) through the real entry point; returns (exit code, stdout, stderr)."""
    from importlib import import_module

    main = import_module(f"{prog}.cli").main
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


def read_all(cache: Cache) -> dict[str, np.ndarray]:
    """Every array of a cache through zarr-python, as raw numpy (bf16 as uint16 bits)."""
    g = cache.group
    return {name: np.asarray(g[name][...]) for name in ["acts", "token_ids", "keep", "seq", "pos", "windows"]}


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
