"""`analyze variance | reconstruction | delta-ce | resid | prompt | examples | report | compare`: parse, call,
print.

Each command is one helper (`_variance`, `_reconstruction`, ...) that runs an analysis and prints its
summary; `report` runs the same helpers into one folder, then renders the HTML from their typed results.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from harvest.errors import SpecError
from harvest.flags import cli_app, run_app, version_option


def _options(
    local_cache: Optional[str] = typer.Option(
        None,
        "--local-cache",
        help="Folder for a verified local copy of a cache in a bucket (also $MLSAE_LOCAL_CACHE); before the command.",
    ),
    version: bool = version_option(),
) -> None:
    if local_cache:
        os.environ["MLSAE_LOCAL_CACHE"] = local_cache  # read by harvest.open_cache for every cache it opens


app = cli_app(
    "Layer distributions, variance ratios, reconstruction quality and residual geometry of SAEs.", callback=_options
)
console = Console()
err_console = Console(stderr=True)

SAE = typer.Option(..., "--run", "--sae", help="Run folder of a trained SAE (train run --out); --sae is an alias.")
SAES = typer.Option(
    ..., "--run", "--sae", help="Run folders (repeat --run, or list them after it); the first leads. Alias: --sae."
)
MORE_RUNS = typer.Argument(None, help="More run folders (single-layer baselines).")
CACHE = typer.Option(None, "--cache", help="Cache folder or URL (default: the (first) run's).")
MODEL = typer.Option(None, "--model", help="Model (default: the cache's).")
DEVICE = typer.Option("auto", "--device", help="auto (cuda when present), cpu, cuda or cuda:N.")
REFERENCE = typer.Option(
    False, "--reference-formulas", help="Also the reference code's (improper) variance formulas, from the same pass."
)


def _cache_of(run: Path, cache: Optional[str]) -> str:
    """The cache (path or URL) a run was trained on, unless --cache says otherwise."""
    if cache is not None:
        return cache
    from train.record import load_run

    return load_run(run, require_sae=False).cache.path


def _log(message: str) -> None:
    err_console.print(f"[dim]{message}[/]")


def _show(text: str) -> None:
    console.print(text, highlight=False, soft_wrap=True, markup=False)


# ---------------------------------------------------------------------------------------------
# one helper per analysis (the commands and `report` call these)


def _variance(run: Path, cache: str, tokens: int, out: Path, reference: bool, device: str) -> None:
    from analyze.layers import format_variance, run_variance

    _show(format_variance(run_variance(run, cache, tokens, out, reference_formulas=reference, device=device, log=_log)))


def _reconstruction(runs: list[Path], cache: Optional[str], out: Path, device: str, tokens: Optional[int]) -> None:
    from analyze.reconstruction import format_reconstruction, run_reconstruction

    _show(format_reconstruction(run_reconstruction(runs, cache_path=cache, out_dir=out, device=device, tokens=tokens)))


def _delta_ce(
    run: Path, model: Optional[str], dataset: Optional[str], tokens: int, cache: Optional[str], out: Path, device: str
) -> None:
    from analyze.delta_ce import format_delta_ce, run_delta_ce

    res = run_delta_ce(run, model, dataset, tokens, out, device, cache_path=cache, show_progress=True)
    _show(format_delta_ce(res))


def _resid(cache: str, sae: Optional[Path], tokens: Optional[int], out: Path, device: str) -> None:
    from analyze.geometry import format_resid, run_mmcs, run_resid
    from train.inputs import open_inputs

    if sae is not None:  # the decoder's MMCS is reported next to this cache's geometry: the same space
        open_inputs(sae, cache, purpose="analyze resid --run")
    res = run_resid(cache, out, tokens=tokens, device=device)
    _show(format_resid(res, run_mmcs(sae, out, device) if sae is not None else None))


# ---------------------------------------------------------------------------------------------
# commands


@app.command()
def variance(
    sae: Path = SAE,
    cache: Optional[str] = CACHE,
    tokens: int = typer.Option(10_000_000, "--tokens", help="Kept tokens to stream (the poster: 10M)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: the run folder)."),
    reference_formulas: bool = REFERENCE,
    device: str = DEVICE,
) -> None:
    """P(L|J), E[L|J], Var(L|J), the two variance ratios and multi-layer fractions; heatmap and histogram."""
    _variance(sae, _cache_of(sae, cache), tokens, out or sae, reference_formulas, device)


@app.command()
def convergence(
    sae: Path = SAE,
    tokens: int = typer.Option(10_000_000, "--tokens", help="Kept tokens for each point's variance ratios."),
    seeds: Optional[list[Path]] = typer.Option(
        None, "--seeds", help="Runs trained like --sae with other seeds: error bars where they have a point (repeat)."
    ),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: <sae>/analysis/convergence)."),
    device: str = DEVICE,
) -> None:
    """Held-out FVU and both variance ratios (proper, reference formula) at each snapshot of a run
    (train --snapshot-tokens) and at its end: convergence.json / .csv / .png; --seeds adds the seed spread."""
    from analyze.convergence import format_convergence, run_convergence

    res = run_convergence(sae, tokens, out or sae / "analysis" / "convergence", seeds or [], device, log=_log)
    _show(format_convergence(res))


@app.command()
def reconstruction(
    sae: list[Path] = SAES,
    runs: Optional[list[Path]] = MORE_RUNS,
    cache: Optional[str] = CACHE,
    tokens: Optional[int] = typer.Option(None, "--tokens", help="Held-out tokens to use (default: all)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: the first run)."),
    device: str = DEVICE,
) -> None:
    """Held-out FVU (both definitions), MSE, L0, dead fraction and firing density per layer; the layer x layer
    FVU matrix and its figure."""
    dirs = [*sae, *(runs or [])]
    _reconstruction(dirs, cache, out or dirs[0], device, tokens)


@app.command("delta-ce")
def delta_ce(
    sae: Path = SAE,
    model: Optional[str] = MODEL,
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Text (default: the run's held-out windows)."),
    tokens: int = typer.Option(2048, "--tokens", help="Tokens of text to evaluate."),
    cache: Optional[str] = CACHE,
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: the run folder)."),
    device: str = DEVICE,
) -> None:
    """Per-layer delta CE and KL: splice each layer's reconstruction into block l's output, vs the clean model
    (--special-tokens reference: vs the model with the special positions zeroed, as the reference code)."""
    _delta_ce(sae, model, dataset, tokens, cache, out or sae, device)


@app.command()
def resid(
    cache: str = typer.Option(..., "--cache", help="Cache folder or URL."),
    sae: Optional[Path] = typer.Option(None, "--run", "--sae", help="Also the MMCS of this run's decoder (mmcs.json)."),
    tokens: Optional[int] = typer.Option(None, "--tokens", help="Kept tokens to stream (default: all)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: the cache folder)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
) -> None:
    """Adjacent-layer cosine similarity of layer-mean-centered residuals, residual norm per layer, decoder MMCS."""
    from harvest.store import is_url

    if out is None and is_url(cache):
        raise SpecError(f"{cache} is in a bucket: pass --out with a local folder for the results")
    _resid(cache, sae, tokens, out or Path(cache), device)


@app.command()
def prompt(
    text: str = typer.Argument(..., help="The prompt."),
    sae: Path = SAE,
    model: Optional[str] = MODEL,
    cache: Optional[str] = CACHE,
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: the run folder)."),
    device: str = DEVICE,
) -> None:
    """The latent x layer heatmap of one prompt, and which latents fire at which layers for each token."""
    from analyze.prompt import run_prompt

    run_prompt(sae, text, model=model, out_dir=out or sae, device=device, cache=cache, console=console)


@app.command()
def examples(
    sae: Path = SAE,
    cache: Optional[str] = CACHE,
    tokens: Optional[int] = typer.Option(None, "--tokens", help="Kept tokens to stream (default: all)."),
    top: int = typer.Option(32, "--top", help="Examples kept per latent, and per latent and layer."),
    samples: int = typer.Option(3, "--samples", help="Random examples kept per latent and activation bin."),
    context: int = typer.Option(
        12, "--context", help="Tokens of context stored on each side (the browser can show fewer)."
    ),
    logits: int = typer.Option(10, "--logits", help="Promoted/suppressed next tokens shown per latent (0: none)."),
    model: Optional[str] = MODEL,
    browser: bool = typer.Option(True, "--browser/--no-browser", help="Write the static latent browser."),
    heldout: bool = typer.Option(False, "--heldout", help="Only the run's held-out tokens (never trained on)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: <run>/latents)."),
    device: str = DEVICE,
) -> None:
    """Top activating examples of every latent (over all layers and per layer), density, histograms, and a
    static HTML latent browser; one streaming pass over the cache, resumable."""
    from analyze.examples import format_examples, run_examples

    shown = dict(
        top=top, samples=samples, context=context, model=model, logits=logits, browser=browser, heldout=heldout
    )
    res = run_examples(sae, cache, tokens, out_dir=out, device=device, log=_log, **shown)
    if res.get("files"):
        console.print(format_examples(res), soft_wrap=True, highlight=False)


@app.command()
def report(
    sae: list[Path] = SAES,
    runs: Optional[list[Path]] = MORE_RUNS,
    cache: Optional[str] = CACHE,
    model: Optional[str] = MODEL,
    tokens: int = typer.Option(1_000_000, "--tokens", help="Kept tokens for the variance analysis."),
    reference_formulas: bool = REFERENCE,
    delta_ce_tokens: int = typer.Option(1024, "--delta-ce-tokens", help="Held-out tokens for delta CE."),
    prompt_text: str = typer.Option(
        "The President addressed the Congress on the state of the Union.", "--prompt", help="Prompt for the heatmap."
    ),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: <first run>/analysis)."),
    device: str = DEVICE,
) -> None:
    """Run every analysis into one folder and write one self-contained HTML report."""
    from analyze.delta_ce import DeltaCeError
    from analyze.prompt import run_prompt
    from analyze.report import clear_results, find_browser, provenance, report_folder
    from analyze.training import run_training
    from train.inputs import open_inputs

    dirs = [*sae, *(runs or [])]
    main_run = dirs[0]
    cache_path = _cache_of(main_run, cache)
    open_inputs(main_run, cache_path, purpose="analyze report", heldout=True)  # before any earlier result is cleared
    folder = out if out is not None else main_run / "analysis"
    prov = provenance(dirs, cache_path)
    clear_results(folder)  # results of an earlier report must not pass for this one's
    prov.save(folder)
    console.rule("variance")
    _variance(main_run, cache_path, tokens, folder, reference_formulas, device)
    console.rule("reconstruction")
    _reconstruction(dirs, cache_path, folder, device, None)
    if run_training([(r.folder, r.label, r.layers) for r in prov.runs], folder) is None:
        _log("no run folder holds heldout.csv (train with --eval-every): the report has no training curve")
    console.rule("delta CE")
    try:
        _delta_ce(main_run, model, None, delta_ce_tokens, cache_path, folder, device)
    except DeltaCeError as e:  # e.g. a run of the legacy chunk split holds out no whole window: report the rest
        _log(f"delta CE left out of the report: {e}")
    console.rule("residual geometry")
    _resid(cache_path, main_run, None, folder, "cpu")
    console.rule("prompt")
    run_prompt(main_run, prompt_text, model=model, out_dir=folder, device=device, cache=cache_path, console=console)
    if find_browser(folder, main_run) is None:
        _log(f"no latent browser under {folder} or {main_run}: run `analyze examples --sae {main_run}` to add one")
    console.print(f"[bold green]report[/] {report_folder(folder, sae_dirs=dirs)}")


@app.command()
def compare(
    folders: list[Path] = typer.Argument(..., help="Analysis folders (e.g. <run>/analysis of `analyze report`)."),
    label: Optional[list[str]] = typer.Option(
        None, "--label", help="A column name per folder (default: the run folder's name)."
    ),
    out: Optional[Path] = typer.Option(None, "--out", help="Write compare.json/.csv/.md here."),
) -> None:
    """Headline numbers and claims of several analysis folders side by side (e.g. quickstart vs scale run)."""
    from analyze.compare import format_compare, run_compare

    res, files = run_compare(folders, label, out)
    _show(format_compare(res))
    if files:
        console.print(f"[bold green]wrote[/] {', '.join(map(str, files))}")


def main() -> None:
    run_app(app, "interrupted: rerun the same command to start the analysis again")


if __name__ == "__main__":
    main()
