"""The tuned lens through the pipeline: harvest --lens stores transformed vectors and records the lens,
train records it, prompt/delta-ce work in the SAE's lens space, `harvest lens train` writes a usable lens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_cli

from analyze.delta_ce import run_delta_ce
from analyze.prompt import run_prompt
from harvest import open_cache
from harvest.cache import verify_cache
from harvest.errors import UserError
from harvest.lens import Lens, params_sha256
from harvest.models import load_bridge, load_tokenizer, resolve_model
from harvest.run import forward_layers, harvest
from harvest.spec import CacheSpec
from train import load_sae
from train.config import TrainConfig
from train.loop import train

CACHE = dict(
    context=32, tokens=32 * 32, chunk_tokens=128, shard_tokens=256, shuffle_tokens=512, batch_size=8, dtype="float32"
)
PROMPT = "The committee met on Tuesday to discuss the budget."


def random_lens(folder: Path, d: int = 32, n: int = 3, scale: float = 0.2, seed: int = 0) -> Path:
    """A lens far from the identity (W ~ scale * N(0, 1/d)), saved in the FAR.AI layout."""
    g = torch.Generator().manual_seed(seed)
    lens = Lens.for_model(d, n, "tiny")
    with torch.no_grad():
        for t in lens.layer_translators:
            t.weight.copy_(scale * torch.randn(d, d, generator=g) / d**0.5)
            t.bias.copy_(torch.randn(d, generator=g))
    return lens.save(folder)


@pytest.fixture(scope="module")
def lens_dir(tmp_path_factory) -> Path:
    return random_lens(tmp_path_factory.mktemp("lens") / "tiny-lens")


@pytest.fixture(scope="module")
def caches(neox_dir, text_dir, lens_dir, tmp_path_factory) -> dict[str, Path]:
    """The same spec harvested without and with the lens."""
    root = tmp_path_factory.mktemp("lens-caches")
    out = {}
    for name, lens in [("plain", "none"), ("lens", str(lens_dir))]:
        out[name] = root / name
        harvest(
            CacheSpec(model=str(neox_dir), dataset=str(text_dir), out=str(out[name]), lens=lens, **CACHE),
            show_progress=False,
        )
    return out


@pytest.fixture(scope="module")
def lens_run(caches, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lens-run") / "run"
    train(
        [
            TrainConfig(
                cache=str(caches["lens"]),
                out=str(out),
                expansion_factor=4,
                k=4,
                batch_tokens=256,
                eval_tokens=256,
                round_chunks=2,
                tokens=256 * 4,
                lr=3e-3,
                log_every=2,
                device="cpu",
            )
        ],
        show_progress=False,
    )
    return out


def test_harvest_through_lens_stores_transformed_vectors_and_records_the_lens(caches, lens_dir):
    plain, lensed = open_cache(caches["plain"]), open_cache(caches["lens"])
    lens = Lens.load(lens_dir)
    assert plain.lens_record is None and plain.lens() is None
    rec = lensed.lens_record
    assert rec["params_sha256"] == params_sha256(lens_dir) and rec["path"] == str(lens_dir.resolve())
    assert rec["translators"] == {"0": 1, "1": 2, "2": None}  # block output l -> translator l + 1; last: identity
    assert lensed.fingerprint != plain.fingerprint
    # same tokens in the same shuffled order; vectors = the lens applied to the plain cache's vectors
    assert torch.equal(plain.read_tokens("token_ids"), lensed.read_tokens("token_ids"))
    for l in (0, 1):
        want = lens.transform(plain.read(l), l)
        assert torch.allclose(lensed.read(l), want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(lensed.read(l), plain.read(l), atol=1e-2)
    assert torch.equal(lensed.read(2), plain.read(2))  # the last block's output is left as it is
    # the cache keeps its own copy of the lens, checked by verify
    assert verify_cache(lensed) == []
    copy = lensed.lens()
    assert all(torch.equal(a, b) for a, b in zip(copy.state_dict().values(), lens.state_dict().values()))


def test_lens_copy_tampering_is_caught_by_verify(caches, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(caches["lens"], bad)
    Lens.load(bad / "lens").save(bad / "lens", dtype=torch.float16)  # same lens, other bytes
    problems = verify_cache(open_cache(bad))
    assert len(problems) == 1 and "differs from the lens the cache was harvested with" in problems[0]


def test_resume_through_a_changed_lens_is_refused(caches, neox_dir, text_dir, tmp_path):
    other = random_lens(tmp_path / "other", seed=1)
    spec = CacheSpec(model=str(neox_dir), dataset=str(text_dir), out=str(caches["lens"]), lens=str(other), **CACHE)
    with pytest.raises(UserError, match="different spec") as e:
        harvest(spec, show_progress=False)
    assert "lens" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"lens": "no/such/lens"}, "no lens at no/such/lens"),
        ({"lens": "LENS", "hook": "resid_pre"}, "use --hook resid_post"),
        ({"lens": "hub"}, "this model is local"),
        ({"lens": "WRONG"}, "d_model=16"),
    ],
)
def test_bad_lens_is_one_line_and_leaves_nothing(change, message, neox_dir, text_dir, lens_dir, tmp_path):
    if change["lens"] == "LENS":
        change = {**change, "lens": str(lens_dir)}
    if change["lens"] == "WRONG":
        change = {"lens": str(Lens.for_model(16, 3).save(tmp_path / "wrong"))}
    out = tmp_path / "cache"
    with pytest.raises(UserError, match=message) as e:
        harvest(
            CacheSpec(model=str(neox_dir), dataset=str(text_dir), out=str(out), **{**CACHE, **change}),
            show_progress=False,
        )
    assert "\n" not in str(e.value)
    assert not out.exists()


def test_train_records_the_lens(lens_run, caches, lens_dir):
    from analyze.report import provenance

    record = json.loads((lens_run / "config.json").read_text())
    assert record["cache"]["lens"] == open_cache(caches["lens"]).lens_record
    assert provenance([lens_run], caches["lens"]).cache.lens == str(lens_dir)  # the report names the lens


def test_prompt_encodes_in_the_lens_space(lens_run, caches, neox_dir, tmp_path):
    r = run_prompt(lens_run, PROMPT, out_dir=tmp_path, device="cpu", show=False)
    assert r.lens["params_sha256"] == open_cache(caches["lens"]).lens_record["params_sha256"]
    source = resolve_model(str(neox_dir))
    tok = load_tokenizer(source)
    ids = [t.id for t in r.tokens]
    x = forward_layers(load_bridge(source, tok, "cpu", torch.float32), torch.tensor([ids]), [0, 1, 2], "resid_post")[
        :, 0
    ]
    lens, sae = open_cache(caches["lens"]).lens(), load_sae(lens_run)

    def n_active(vectors: torch.Tensor) -> list[int]:
        values, indices = sae.encode(vectors)
        return [
            len({j for l in range(3) for v, j in zip(values[l, t].tolist(), indices[l, t].tolist()) if v > 1e-3})
            for t in range(len(ids))
        ]

    lensed = torch.stack([lens.transform(x[l], l) for l in range(3)])
    assert [t.n_active for t in r.tokens] == n_active(lensed)
    assert n_active(lensed) != n_active(x)  # the check above can tell the two spaces apart


def test_delta_ce_through_the_lens_runs_against_the_clean_model(lens_run, tmp_path):
    res = run_delta_ce(lens_run, tokens=64, out_dir=tmp_path, device="cpu")
    assert res.lens["translators"] == {"0": 1, "1": 2, "2": None}
    assert np.isfinite(res.clean_ce) and all(np.isfinite(res.delta_ce)) and all(k >= 0 for k in res.kl)


def test_lens_train_cli_writes_a_lens_that_harvest_accepts(neox_dir, text_dir, tmp_path, capsys):
    out = tmp_path / "lenses" / "tiny"
    args = [
        "lens",
        "train",
        "--model",
        neox_dir,
        "--dataset",
        text_dir,
        "--context",
        32,
        "--tokens",
        32 * 12,
        "--steps",
        6,
        "--batch",
        2,
        "--heldout",
        2,
        "--vocab-chunk",
        128,
        "--out",
        out,
        "--quiet",
    ]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    assert "| block | logit lens KL | tuned lens KL |" in stdout and "held-out KL" in stdout
    report = json.loads((out / "report.json").read_text())
    assert len(report["kl_logit_lens"]) == len(report["kl_tuned_lens"]) == 3
    assert report["kl_tuned_lens"][-1] == report["kl_logit_lens"][-1] == pytest.approx(0, abs=1e-6)
    assert report["train_tokens"] == 6 * 2 * 32 and report["heldout_tokens"] == 2 * 32
    assert (out / "kl.png").read_bytes()[:4] == b"\x89PNG"
    lens = Lens.load(out, 32, 3)
    assert any(t.weight.abs().max() > 0 for t in lens.layer_translators)  # it was trained
    assert not list(out.parent.glob(".*"))  # no temp folder left behind
    # a second run refuses to overwrite it, in one line
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "already holds a lens" in err and err.count("\n") == 1
    # and harvest accepts it
    cache = tmp_path / "cache"
    code, _, err = run_cli(
        [
            "run",
            "--model",
            neox_dir,
            "--dataset",
            text_dir,
            "--lens",
            out,
            "--out",
            cache,
            "--context",
            32,
            "--tokens",
            256,
            "--chunk-tokens",
            128,
            "--shard-tokens",
            256,
            "--shuffle-tokens",
            256,
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    assert open_cache(cache).lens_record["params_sha256"] == params_sha256(out)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--kl-dtype", "float16"], "kl_dtype = 'float16'"),
        (["--steps", "0"], "steps = 0 must be a positive integer"),
        (["--tokens", "64", "--context", "32", "--heldout", "2"], "leave none for training"),
        (["--dataset", "no/such/folder/"], "not found"),
    ],
)
def test_lens_train_bad_input_is_one_line(flags, message, neox_dir, tmp_path, capsys):
    out = tmp_path / "lens"
    code, _, err = run_cli(["lens", "train", "--model", neox_dir, "--out", out, "--quiet", *flags], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_info_shows_the_lens(caches, capsys):
    code, out, _ = run_cli(["info", caches["lens"]], capsys)
    flat = " ".join(out.split())
    assert code == 0 and "tuned lens" in flat and "translator l+1 (trained on hidden_states[l+1])" in flat
    code, out, _ = run_cli(["info", caches["plain"]], capsys)
    assert code == 0 and "tuned lens" not in out
