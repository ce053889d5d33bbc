"""`analyze variance | reconstruction | delta-ce | resid | prompt | examples | report | compare`: parse, call,
print."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from harvest.flags import run_app

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Layer distributions, variance ratios, reconstruction quality and residual geometry of SAEs.",
)
console = Console()
err_console = Console(stderr=True)

SAE = typer.Option(..., "--sae", help="Run folder of a trained SAE (train run --out).")
DEVICE = typer.Option("auto", "--device", help="auto (cuda when present), cpu, cuda or cuda:N.")


def _cache_of(run: Path, cache: Optional[Path]) -> Path:
    """The cache a run was trained on, unless --cache says otherwise."""
    if cache is not None:
        return cache
    from train.record import load_run

    return Path(load_run(run, require_sae=False).cache.path)


def _out(out: Optional[Path], run: Path) -> Path:
    return out if out is not None else run


def _print_variance(res: dict[str, Any]) -> None:
    ml = res["multi_layer"]
    console.print(f"[bold]variance[/] over {res['tokens']:,} tokens, layers {res['layers'][0]}..{res['layers'][-1]}")
    console.print(
        f"  Var(L) = {res['var_l']:.4g}   E[Var(L|J)] = {res['exp_var_l_given_j']:.4g}   "
        f"E[Var(L|J,T)] = {res['exp_var_l_given_jt']:.4g}"
    )
    console.print(
        f"  E[Var(L|J)]/Var(L) = [bold]{res['ratio_latent']:.4f}[/]   "
        f"E[Var(L|J,T)]/E[Var(L|J)] = [bold]{res['ratio_token']:.4f}[/]"
    )
    console.print(
        f"  latents active at >1 layer: {ml['per_token_pooled']:.1%} per token (pooled), "
        f"{ml['aggregated']:.1%} aggregated over tokens"
    )
    ref = res.get("reference_formulas")
    if ref:
        console.print(
            f"  [dim]reference code's formulas (not proper variances): "
            f"{ref['ratio_latent_ref']:.4f}, {ref['ratio_token_ref']:.4f}[/]"
        )


@app.command()
def variance(
    sae: Path = SAE,
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache (default: the run's)."),
    tokens: int = typer.Option(10_000_000, "--tokens", help="Kept tokens to stream (the poster: 10M)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: the run folder)."),
    reference_formulas: bool = typer.Option(
        False, "--reference-formulas", help="Also report the reference code's (improper) formulas."
    ),
    device: str = DEVICE,
) -> None:
    """P(L|J), E[L|J], Var(L|J), the two variance ratios and multi-layer fractions; heatmap and histogram."""
    from analyze.layers import run_variance

    res = run_variance(
        sae,
        _cache_of(sae, cache),
        tokens,
        _out(out, sae),
        reference_formulas=reference_formulas,
        device=device,
        log=lambda m: err_console.print(f"[dim]{m}[/]"),
    )
    if res:
        _print_variance(res)


@app.command()
def reconstruction(
    sae: list[Path] = typer.Option(..., "--sae", help="Run folders (repeat --sae, or list them after it)."),
    runs: Optional[list[Path]] = typer.Argument(None, help="More run folders."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache (default: the first run's)."),
    tokens: Optional[int] = typer.Option(None, "--tokens", help="Held-out tokens to use (default: all)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: the first run)."),
    device: str = DEVICE,
) -> None:
    """Held-out FVU (both definitions), MSE, L0, dead fraction; the layer x layer FVU matrix and its figure."""
    from analyze.reconstruction import format_reconstruction, run_reconstruction

    dirs = [*sae, *(runs or [])]
    res = run_reconstruction(dirs, cache_path=cache, out_dir=_out(out, dirs[0]), device=device, tokens=tokens)
    console.print(format_reconstruction(res))


@app.command("delta-ce")
def delta_ce(
    sae: Path = SAE,
    model: Optional[str] = typer.Option(None, "--model", help="Model (default: the cache's)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Text (default: the cache's own windows)."),
    tokens: int = typer.Option(2048, "--tokens", help="Tokens of text to evaluate."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache (default: the run's)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: the run folder)."),
    device: str = DEVICE,
) -> None:
    """Per-layer delta CE and KL: splice each layer's reconstruction into block l's output, vs the clean model."""
    from analyze.delta_ce import format_delta_ce, run_delta_ce

    res = run_delta_ce(
        sae,
        model=model,
        dataset=dataset,
        tokens=tokens,
        out_dir=_out(out, sae),
        device=device,
        cache_path=cache,
        show_progress=True,
    )
    console.print(format_delta_ce(res))


@app.command()
def resid(
    cache: Path = typer.Option(..., "--cache", help="Cache folder."),
    sae: Optional[Path] = typer.Option(None, "--sae", help="Also the MMCS of this SAE's decoder."),
    tokens: Optional[int] = typer.Option(None, "--tokens", help="Kept tokens to stream (default: all)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: the cache folder)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
) -> None:
    """Adjacent-layer cosine similarity of layer-mean-centered residuals, residual norm per layer, decoder MMCS."""
    from analyze.geometry import run_resid

    _print_resid(run_resid(cache, _out(out, cache), tokens=tokens, sae_dir=sae, device=device))


def _print_resid(res: dict[str, Any]) -> None:
    table = Table("layers", "cos (centered)", "cos (raw)")
    for pair, c, u in zip(res["pairs"], res["cosine_centered"], res["cosine_uncentered"]):
        table.add_row(f"{pair[0]}->{pair[1]}", f"{c:.3f}", f"{u:.3f}")
    console.print(table)
    console.print("mean norm per layer: " + ", ".join(f"{n:.4g}" for n in res["norm_mean"]))
    if "mmcs" in res:
        console.print(f"decoder MMCS: {res['mmcs']['mmcs']:.4f}")


@app.command()
def prompt(
    text: str = typer.Argument(..., help="The prompt."),
    sae: Path = SAE,
    model: Optional[str] = typer.Option(None, "--model", help="Model (default: the cache's)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: the run folder)."),
    device: str = DEVICE,
) -> None:
    """The latent x layer heatmap of one prompt, and which latents fire at which layers for each token."""
    from analyze.prompt import run_prompt

    run_prompt(sae, text, model=model, out_dir=_out(out, sae), device=device, console=console)


@app.command()
def examples(
    sae: Path = SAE,
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache (default: the run's)."),
    tokens: Optional[int] = typer.Option(None, "--tokens", help="Kept tokens to stream (default: all)."),
    top: int = typer.Option(32, "--top", help="Examples kept per latent, and per latent and layer."),
    context: int = typer.Option(8, "--context", help="Tokens of context shown on each side."),
    logits: int = typer.Option(10, "--logits", help="Promoted/suppressed next tokens shown per latent (0: none)."),
    model: Optional[str] = typer.Option(None, "--model", help="Model for tokens and logits (default: the cache's)."),
    browser: bool = typer.Option(True, "--browser/--no-browser", help="Write the static latent browser."),
    heldout: bool = typer.Option(False, "--heldout", help="Only the run's held-out tokens (never trained on)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: <run>/latents)."),
    device: str = DEVICE,
) -> None:
    """Top activating examples of every latent (over all layers and per layer), density, histograms, and a
    static HTML latent browser; one streaming pass over the cache, resumable."""
    from analyze.examples import format_examples, run_examples

    shown = dict(top=top, context=context, model=model, logits=logits, browser=browser, heldout=heldout)
    res = run_examples(sae, cache, tokens, out_dir=out, device=device, log=lambda m: err_console.print(m), **shown)
    if res.get("files"):
        console.print(format_examples(res), soft_wrap=True, highlight=False)


@app.command()
def report(
    sae: list[Path] = typer.Option(..., "--sae", help="Run folders; the first is analysed in depth."),
    runs: Optional[list[Path]] = typer.Argument(None, help="More run folders (single-layer baselines)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache (default: the first run's)."),
    model: Optional[str] = typer.Option(
        None, "--model", help="Model for delta CE and the prompt (default: the cache's)."
    ),
    tokens: int = typer.Option(1_000_000, "--tokens", help="Kept tokens for the variance analysis."),
    delta_ce_tokens: int = typer.Option(1024, "--delta-ce-tokens", help="Tokens of text for delta CE."),
    prompt_text: str = typer.Option(
        "The President addressed the Congress on the state of the Union.",
        "--prompt",
        help="Prompt for the per-token heatmap.",
    ),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: <first run>/analysis)."),
    device: str = DEVICE,
) -> None:
    """Run every analysis into one folder and write one self-contained HTML report."""
    from analyze.delta_ce import format_delta_ce, run_delta_ce
    from analyze.geometry import run_resid
    from analyze.layers import run_variance
    from analyze.prompt import run_prompt
    from analyze.reconstruction import format_reconstruction, run_reconstruction
    from analyze.report import report_folder

    dirs = [*sae, *(runs or [])]
    main_run = dirs[0]
    cache_path = _cache_of(main_run, cache)
    folder = out if out is not None else main_run / "analysis"
    folder.mkdir(parents=True, exist_ok=True)
    log = lambda m: err_console.print(f"[dim]{m}[/]")
    console.rule("variance")
    _print_variance(run_variance(main_run, cache_path, tokens, folder, device=device, log=log))
    console.rule("reconstruction")
    console.print(format_reconstruction(run_reconstruction(dirs, cache_path=cache_path, out_dir=folder, device=device)))
    console.rule("delta CE")
    console.print(
        format_delta_ce(
            run_delta_ce(
                main_run,
                model=model,
                tokens=delta_ce_tokens,
                out_dir=folder,
                device=device,
                cache_path=cache_path,
                show_progress=True,
            )
        )
    )
    console.rule("residual geometry")
    _print_resid(run_resid(cache_path, folder, sae_dir=main_run))
    console.rule("prompt")
    run_prompt(main_run, prompt_text, model=model, out_dir=folder, device=device, cache=cache_path, console=console)
    html = report_folder(folder, sae_dirs=dirs, cache=cache_path)
    console.print(f"[bold green]report[/] {html}")


@app.command()
def compare(
    folders: list[Path] = typer.Argument(..., help="Analysis folders (e.g. <run>/analysis of `analyze report`)."),
    label: Optional[list[str]] = typer.Option(
        None, "--label", help="A column name per folder (default: the run folder's name)."
    ),
    out: Optional[Path] = typer.Option(None, "--out", help="Write compare.json/.csv/.md here."),
) -> None:
    """The headline numbers of several analysis folders side by side (e.g. with and without a tuned lens)."""
    from analyze.compare import format_compare, run_compare

    res = run_compare(folders, label, out)
    console.print(format_compare(res), highlight=False, soft_wrap=True)
    if res.get("files"):
        console.print(f"[bold green]wrote[/] {', '.join(res['files'])}")


def main() -> None:
    run_app(app, "interrupted")


if __name__ == "__main__":
    main()
