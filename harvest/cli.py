"""`harvest run | info | verify | push | pull | upgrade | lens train`: parse, call, print. Every CacheSpec
field is a `run` flag of the same name; every cache argument is a folder or a URL."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from .flags import cli_app, run_app, with_dataclass_flags
from .lens_train import LensSpec, LensTrainConfig
from .spec import CacheSpec

app = cli_app("Harvest per-layer residual streams into a sharded zarr cache.")
console = Console()
err_console = Console(stderr=True)


def _log(message: str) -> None:
    """A progress note on stderr: dim, one line however narrow the terminal (paths are not markup)."""
    from rich.markup import escape

    err_console.print(f"[dim]{escape(message)}[/]", soft_wrap=True)


def _human(n: float) -> str:
    for unit in ["B", "KB", "MB", "GB", "TB"]:
        if n < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


@app.command()
@with_dataclass_flags(CacheSpec)
def run(
    spec: Optional[Path] = typer.Option(
        None, "--config", "--spec", help="YAML spec file (cache_spec.yaml); flags override it. Alias: --spec."
    ),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    **overrides: Any,
) -> None:
    """Harvest (or resume) a cache. Same spec and --out again = resume; finished caches are left as they are."""
    from .run import harvest

    cache_spec = (CacheSpec.from_yaml(spec) if spec else CacheSpec()).replace(**overrides)
    s = harvest(cache_spec, show_progress=not quiet, log=_log)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if s.blocks_this_run == 0:
        console.print(f"{s.path}: already complete ({s.tokens_total:,} tokens), nothing to do")
        return
    console.print(
        f"[bold green]done[/] {s.path}: {s.tokens_total:,} tokens x {len(s.layers)} layers, "
        f"{_human(s.bytes_on_disk)} on disk; this run harvested {s.tokens_this_run:,} tokens in {s.loop_seconds:.1f} s "
        f"({s.tokens_per_s:,.0f} tok/s), {s.seconds:.1f} s in all with loading and tokenizing"
        f"{' (resumed)' if s.resumed else ''}"
    )


@app.command()
def info(path: str = typer.Argument(..., help="Cache folder or URL (s3://, gs://, az://, file://).")) -> None:
    """Spec, shape, tokens, layers, dtype, size, completeness and per-layer norms of a cache (reads only the
    metadata, manifests and statistics: no data is downloaded from a bucket)."""
    from .cache import open_cache

    cache = open_cache(path)
    lay, meta = cache.layout, cache.meta
    done = len(cache.complete_blocks())
    old = [b for b, m in cache.manifests().items() if not m.checksummed]
    console.print(f"[bold]{path}[/]  fingerprint {cache.fingerprint}")
    console.print(
        f"model {meta['model']['name']} ({meta['model']['architecture']}), dataset {meta['spec']['dataset']}, "
        f"hook {meta['spec']['hook']}"
    )
    if cache.lens_record is not None:
        from rich.markup import escape

        rec = cache.lens_record
        console.print(
            escape(
                f"tuned lens {rec['source']} (params sha256 {rec['params_sha256'][:12]}; copy in "
                f"{path}/lens): {rec['mapping']}"
            )
        )
    console.print(
        f"shape \\[layers={len(lay.layers)}, tokens={lay.n_tokens:,}, d={lay.d_model}] = "
        f"{lay.n_sequences:,} windows x {lay.context}; dtype {lay.dtype}, compression {lay.compression}"
    )
    console.print(
        f"chunks {lay.chunk_tokens} tokens, shards {lay.shard_tokens}, shuffle blocks {lay.block_tokens}; "
        f"size on disk {_human(cache.size_on_disk())}"
    )
    state = "[green]complete[/]" if done == lay.n_blocks else "[yellow]incomplete[/] (rerun `harvest run` to resume)"
    console.print(f"blocks {done}/{lay.n_blocks} {state}")
    if old:
        console.print(f"[yellow]{len(old)} blocks have no chunk checksums[/]: run `harvest upgrade {path}` once")
    if lay.dtype == "float8":
        rec = meta.get("float8") or {}
        console.print(
            f"float8 e4m3 codes x per-channel scales (the `scales` array; headroom {rec.get('headroom')}, calibrated "
            f"on {rec.get('calibration_tokens')} tokens): {_human(lay.bytes_per_token())} per token of acts"
        )
    stats = cache.stats()
    nonfinite = bool(stats.nonfinite.any())  # only with --allow-nonfinite
    out_of_range = bool(stats.out_of_range.any())  # only with --allow-out-of-range
    table = Table("layer", "kept vectors", "mean norm", "mean feature std", "max |mean|")
    if nonfinite:
        table.add_column("NaN/inf values")
    if out_of_range:
        table.add_column("out-of-range values")
    for i, l in enumerate(lay.layers):
        table.add_row(
            str(l),
            f"{int(stats.count[i]):,}",
            f"{stats.mean_norm[i]:.4g}",
            f"{stats.var[i].sqrt().mean():.4g}",
            f"{stats.mean[i].abs().max():.4g}",
            *([f"{int(stats.nonfinite[i]):,}"] if nonfinite else []),
            *([f"{int(stats.out_of_range[i]):,}"] if out_of_range else []),
        )
    console.print(table)
    if nonfinite:
        console.print(
            f"[yellow]{int(stats.nonfinite.sum()):,} NaN/inf values stored[/] (harvested with --allow-nonfinite; "
            f"the statistics above leave out the vectors holding them)"
        )
    if out_of_range:
        console.print(
            f"[yellow]{int(stats.out_of_range.sum()):,} values beyond the float8 scales' range stored saturated[/] "
            f"(harvested with --allow-out-of-range)"
        )
    console.print("spec: " + ", ".join(f"{k}={v}" for k, v in meta["spec"].items()))


@app.command()
def verify(path: str = typer.Argument(..., help="Cache folder or URL.")) -> None:
    """Re-read every file a reader trusts (acts, token arrays, windows, stats, lens copy) and check it against
    the manifests (size, crc32, shard index crc32c, every inner chunk's xxh3) and the metadata hash; exit 1
    listing missing, truncated or corrupt files or blocks. On a bucket: ranged reads, several in flight."""
    from .cache import Cache, verify_cache
    from .progress import progress_bar
    from .store import open_store

    cache = Cache(open_store(path))  # the location itself, never a read-through copy ($MLSAE_LOCAL_CACHE)
    total = cache.size_on_disk()
    with progress_bar("verify", total, bytes_=True, console=err_console) as bar:
        problems = verify_cache(cache, progress=bar.advance)
    if problems:
        for p in problems[:20]:
            err_console.print(f"[red]problem[/]: {p}")
        if len(problems) > 20:
            err_console.print(f"... and {len(problems) - 20} more")
        err_console.print(f"error: {path} failed verification ({len(problems)} problems)")
        raise typer.Exit(1)
    console.print(f"[green]ok[/] {path}: {cache.layout.n_blocks} blocks, {cache.layout.n_tokens:,} tokens verified")


def _copy(src_location: str, dst_location: str, what: str) -> None:
    from .cache import Cache, copy_cache
    from .lock import Lock
    from .progress import progress_bar
    from .store import open_store

    src = Cache(open_store(src_location))  # the source itself, never a read-through copy ($MLSAE_LOCAL_CACHE)
    total = sum(f.size for m in src.manifests().values() for f in m.files.values())
    lock = Lock(open_store(dst_location), what)
    with lock, progress_bar(what.split()[-1], total, bytes_=True, console=err_console) as bar:
        result = copy_cache(src, lock.store, progress=bar.advance, log=_log)
    done = len(src.complete_blocks())
    state = "complete" if done == src.layout.n_blocks else f"{done}/{src.layout.n_blocks} blocks (partial cache)"
    fixed = f", {len(result.repaired)} damaged files copied again" if result.repaired else ""
    console.print(
        f"[green]ok[/] {src_location} -> {dst_location}: {result.copied} blocks copied, {result.skipped} already "
        f"there (checked){fixed}; {state}"
    )


@app.command()
def push(
    local: str = typer.Argument(..., help="Cache folder."),
    url: str = typer.Argument(..., help="Destination URL (s3://BUCKET/PREFIX, gs://..., az://...)."),
) -> None:
    """Copy a complete or partial cache to object storage, block by block, each manifest after its files;
    every file checked against its manifest. Rerun after an interruption to resume."""
    _copy(local, url, "harvest push")


@app.command()
def pull(
    url: str = typer.Argument(..., help="Cache URL."),
    local: str = typer.Argument(..., help="Destination folder."),
) -> None:
    """Copy a cache from object storage to a local folder (same protocol as push; resumable)."""
    _copy(url, local, "harvest pull")


@app.command()
def upgrade(path: str = typer.Argument(..., help="Cache folder or URL harvested by an older version.")) -> None:
    """Add chunk checksums and the metadata hash to a cache harvested before they existed: every file is
    first checked against the crc32 its manifest recorded, the windows against the token arrays. Safe to
    rerun; run it after the harvest has finished (it takes the cache's lock)."""
    from .cache import Cache, upgrade_cache
    from .lock import Lock
    from .store import open_store

    cache = Cache(open_store(path))  # it writes manifests: the location itself, never a read-through copy
    with Lock(cache.store, "harvest upgrade"):
        n = upgrade_cache(cache, log=_log)
    done = len(cache.complete_blocks())
    console.print(f"[green]ok[/] {path}: {n} manifests upgraded; {done}/{cache.layout.n_blocks} blocks have checksums")


lens_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Tuned lenses: train one for a model (FAR.AI file layout).",
)
app.add_typer(lens_app, name="lens")


@lens_app.command("train")
@with_dataclass_flags(LensSpec, LensTrainConfig)
def lens_train(
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of the fields below; flags override it."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    **overrides: Any,
) -> None:
    """Train a tuned lens (forward KL to the final layer, the tuned-lens recipe) and report held-out KL per
    block against the logit lens. Defaults take ~11 minutes on a 2-core CPU for the embedded Gemma 3 270M."""
    from dataclasses import fields

    from .flags import read_yaml_mapping, replace_fields
    from .lens_train import run_lens_training

    given = read_yaml_mapping(config, "lens config", "--config") if config else {}
    given.update({k: v for k, v in overrides.items() if v is not None})  # unset flags keep the YAML's values
    names = {f.name for f in fields(LensSpec)}
    spec = replace_fields(LensSpec(), {k: v for k, v in given.items() if k in names}, "lens")
    cfg = replace_fields(LensTrainConfig(), {k: v for k, v in given.items() if k not in names}, "lens")
    report = run_lens_training(spec, cfg, progress=not quiet, log=_log)
    console.print(report.table())
    gain = [t / z for z, t in zip(report.kl_logit_lens, report.kl_tuned_lens) if z > 0]
    console.print(
        f"[bold green]done[/] {spec.out}: {report.steps} steps on {report.train_tokens:,} tokens in "
        f"{report.seconds:.0f} s; held-out KL ({report.heldout_tokens:,} tokens) tuned/logit lens: median "
        f"{sorted(gain)[len(gain) // 2]:.3f} over {len(gain)} blocks"
    )


def main() -> None:
    run_app(app, "interrupted: rerun the same command to resume")


if __name__ == "__main__":
    main()
