"""`train run | sweep | export`: parse, call, print. Every TrainConfig field is a flag of the same name."""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from harvest.errors import SpecError
from harvest.flags import cli_app, default_note, run_app, with_dataclass_flags
from train.config import TrainConfig

app = cli_app("Train TopK multi-layer SAEs (and single-layer baselines) from a harvested cache.")
console = Console()
SWEPT = ("expansion_factor", "k", "layers")


def _base(config: Optional[Path], overrides: dict[str, Any]) -> TrainConfig:
    return (TrainConfig.from_yaml(config) if config else TrainConfig()).replace(**overrides)


def _print(summaries: list[dict]) -> None:
    if int(os.environ.get("RANK", "0")) != 0:
        return
    for s in summaries:
        final, initial = s["held_out"], s["held_out_initial"] or {}
        console.print(
            f"[bold green]done[/] {s['out']}: {s['steps']:,} steps, {s['tokens']:,} tokens, "
            f"{s['tokens_per_s']:,.0f} tok/s; held-out FVU {final['fvu_mean']:.4f} "
            f"(per-feature {final['fvu_feature_mean']:.4f}), initially {initial.get('fvu_mean', float('nan')):.4f}; "
            f"silent on held-out tokens at every layer {final['silent_on_heldout_all_layers']:.1%}"
        )
        table = Table("layer", "FVU", "FVU per-feature", "MSE", "L0", "silent on held-out")
        for i, l in enumerate(final["layers"]):
            table.add_row(
                str(l),
                f"{final['fvu'][i]:.4f}",
                f"{final['fvu_feature'][i]:.4f}",
                f"{final['mse'][i]:.4g}",
                f"{final['l0'][i]:.1f}",
                f"{final['silent_on_heldout'][i]:.1%}",
            )
        console.print(table)


@app.command()
@with_dataclass_flags(TrainConfig, short={"k": "-k"})
def run(
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of TrainConfig fields; flags override it."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    **overrides: Any,
) -> None:
    """Train one SAE: `--layers all` (multi-layer SAE) or `--layers L` (single-layer baseline). The same
    command again resumes from the last checkpoint."""
    from train.loop import train

    _print(train([_base(config, overrides)], show_progress=not quiet))


@app.command()
@with_dataclass_flags(TrainConfig, exclude=SWEPT + ("out",))
def sweep(
    expansion_factor: Optional[str] = typer.Option(
        None, "--expansion-factor", help="Comma list, e.g. 16,32,64." + default_note("the config's, 64")
    ),
    k: Optional[str] = typer.Option(
        None, "-k", "--k", help="Comma list, e.g. 16,32,64." + default_note("the config's, 32")
    ),
    layers: Optional[str] = typer.Option(
        None, "--layers", help="Comma list of 'all' and/or layer numbers, e.g. all,0,3." + default_note("all")
    ),
    out: Optional[Path] = typer.Option(None, "--out", help="Parent folder of the run folders (default runs/)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of TrainConfig fields."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    **overrides: Any,
) -> None:
    """Train every combination in ONE pass over the cache: each chunk is read once and feeds every SAE."""
    from train.loop import train

    base = _base(config, overrides)
    try:
        xs = [int(v) for v in (expansion_factor or str(base.expansion_factor)).split(",")]
        ks = [int(v) for v in (k or str(base.k)).split(",")]
    except ValueError:
        raise SpecError("--expansion-factor and -k take comma lists of integers, e.g. 16,32,64")
    all_layers = [v.strip() for v in (layers or base.layers).split(",")]
    # one folder per configuration, named after it, under --out (default runs/)
    configs = [base.replace(expansion_factor=x, k=kk, layers=ls) for x, kk, ls in itertools.product(xs, ks, all_layers)]
    configs = [c.replace(out=str((out or Path("runs")) / Path(c.default_out()).name)) for c in configs]
    _print(train(configs, show_progress=not quiet))


@app.command()
def export(
    run: Path = typer.Argument(..., help="Run folder of a finished `train run`."),
    format: str = typer.Option(
        ..., "--format", help="saelens (one SAELens folder per layer) or delphi (latent cache)."
    ),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: <run>/<format>)."),
    push_to_hub: Optional[str] = typer.Option(
        None, "--push-to-hub", help="Also upload it to this Hub repo (NAME/REPO)."
    ),
    cache: Optional[str] = typer.Option(
        None, "--cache", help="Cache folder or URL (default: the run's; or another harvest of its model)."
    ),
    tokens: Optional[int] = typer.Option(None, "--tokens", help="delphi: kept tokens to stream (default: all)."),
    splits: int = typer.Option(5, "--splits", help="delphi: latent ranges per module (files; memory per split)."),
    device: str = typer.Option("auto", "--device", help="auto (cuda when present), cpu, cuda or cuda:N."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Export a trained SAE for SAELens (SAE.load_from_disk) or delphi (auto-interpretability), and optionally
    push it to the Hugging Face Hub with a model card."""
    from train.export import export_run

    res = export_run(
        run,
        format,
        out if out is not None else run / format,
        push_to_hub=push_to_hub,
        cache_path=cache,
        tokens=tokens,
        splits=splits,
        device=device,
        progress=not quiet,
        log=console.print,
    )
    console.print(
        f"[bold green]exported[/] {res['format']}: {res['out']} ({len(res['parts'])} folder(s): "
        f"{', '.join(res['parts'][:3])}{', ...' if len(res['parts']) > 3 else ''}) in {res['seconds']:.1f} s",
        soft_wrap=True,
        highlight=False,
    )


def main() -> None:
    run_app(app, "interrupted: rerun the same command to resume from the last checkpoint")


if __name__ == "__main__":
    main()
