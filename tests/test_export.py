"""`train export`: SAELens folders checked with an independent re-implementation of SAELens's TopK forward (no
sae_lens import), the c fold shown to matter, delphi latent caches against a dense brute force, and the
one-line refusals (no SAE, lens space, unknown format, offline or unreachable Hub) before any work."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import harvest_and_train, run_cli
from safetensors.numpy import load_file as load_np
from safetensors.torch import load_file

from train.export import export_run


@pytest.fixture(scope="module")
def tiny_run(neox_dir, tmp_path_factory) -> tuple[Path, Path]:
    return harvest_and_train(tmp_path_factory.mktemp("export"), neox_dir, expansion_factor=4)


# ---------------------------------------------------------------------------------------------
# SAELens's TopK SAE, re-implemented from its documented behaviour (sae_lens 6: SAE.process_sae_in,
# layer_norm run-time normalization with torch's default, Bessel-corrected std; TopKSAE.encode/decode)


def saelens_forward(folder: Path, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["normalize_activations"] == "layer_norm"
    assert cfg["apply_b_dec_to_input"] is True and not cfg["rescale_acts_by_decoder_norm"]
    # SAELens reads a config whose version is missing or below 6 as a pre-6 one, with the metadata keys at the
    # top level (sae_lens handle_config_defaulting / handle_pre_6_0_config): both readings give the same
    version = cfg["metadata"]["sae_lens_version"]
    pre6 = version is None or int(version.split(".")[0]) < 6
    meta = {k: cfg[k] for k in cfg["metadata"] if k in cfg} if pre6 else cfg["metadata"]
    assert meta["hook_name"] == cfg["metadata"]["hook_name"] and meta["model_name"] == cfg["metadata"]["model_name"]
    w = {k: v.double() for k, v in load_file(str(folder / "sae_weights.safetensors")).items()}
    assert w["W_enc"].shape == (cfg["d_in"], cfg["d_sae"]) and w["W_dec"].shape == (cfg["d_sae"], cfg["d_in"])
    x = x.double()
    mu = x.mean(-1, keepdim=True)
    x = x - mu
    std = x.std(-1, keepdim=True)  # unbiased: what SAELens's layer_norm uses
    x = x / (std + 1e-5)
    hidden_pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    top = hidden_pre.topk(cfg["k"], dim=-1)
    acts = torch.zeros_like(hidden_pre).scatter_(-1, top.indices, top.values.relu())
    out = (acts @ w["W_dec"] + w["b_dec"]) * std + mu
    return acts, out


def ours(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        o = sae(x)
    acts = torch.zeros(len(x), sae.cfg.n_latents, dtype=torch.float64).scatter_(1, o.indices, o.values.double())
    return acts, o.x_hat.double()


def test_saelens_export_equals_our_sae_including_the_fold(tiny_run, tmp_path):
    from harvest import ChunkReader, open_cache
    from train.record import load_run

    cache_path, run = tiny_run
    record = load_run(run)
    sae = record.load_sae()
    res = export_run(run, "saelens", tmp_path / "sl", progress=False)
    assert res["parts"] == [f"blocks.{l}.hook_resid_post" for l in record.layers]
    # an MLSAE: one folder per layer, each with its hook and the same weights
    w0 = (tmp_path / "sl" / res["parts"][0] / "sae_weights.safetensors").read_bytes()
    from train.export import installed_version

    for layer, part in zip(record.layers, res["parts"]):
        cfg = json.loads((tmp_path / "sl" / part / "cfg.json").read_text())
        assert cfg["metadata"]["hook_name"] == f"blocks.{layer}.hook_resid_post" and cfg["k"] == sae.cfg.k
        assert cfg["metadata"]["sae_lens_version"] == installed_version("sae-lens")  # None where it is absent
        assert cfg["hook_name"] == cfg["metadata"]["hook_name"]  # for a pre-6 reading
        assert (tmp_path / "sl" / part / "sae_weights.safetensors").read_bytes() == w0
    card = (tmp_path / "sl" / "README.md").read_text()
    assert "library_name: saelens" in card and "held-out FVU" in card and record.cache.fingerprint in card
    assert "base_model" not in card  # a local model has no Hub id (and its path is no one else's)
    assert str(tmp_path) not in card and str(run) not in (tmp_path / "sl" / "mlsae_export.json").read_text()

    # real cache vectors of every layer, plus vectors with a large mean offset and near-tied pre-activations
    cache = open_cache(cache_path)
    x = torch.cat([ch.acts[:, ch.keep].float().reshape(-1, sae.cfg.d_model) for ch in ChunkReader(cache)][:2])
    g = torch.Generator().manual_seed(0)
    x = torch.cat([x[::7], 3 * torch.randn(200, sae.cfg.d_model, generator=g) + 50.0])
    want_acts, want_out = ours(sae, x)
    acts, out = saelens_forward(tmp_path / "sl" / res["parts"][1], x)
    assert ((acts - want_acts).abs().max(1).values <= 1e-5 * want_acts.abs().max(1).values.clamp_min(1)).all()
    rel = (out - want_out).norm(dim=1) / want_out.norm(dim=1)
    assert rel.max() < 1e-5

    # without the fold the same check fails: other top-k sets, and reconstructions off by ~1/c
    from train import export as ex

    unfolded = tmp_path / "unfolded"
    unfolded.mkdir()
    shutil.copy(tmp_path / "sl" / res["parts"][1] / "cfg.json", unfolded)
    from safetensors.torch import save_file

    save_file(ex.saelens_tensors(sae, fold=False), str(unfolded / "sae_weights.safetensors"))
    acts_u, out_u = saelens_forward(unfolded, x)
    other_set = ((acts_u > 0) != (want_acts > 0)).any(1)
    assert other_set.sum() >= 1
    assert ((out_u - want_out).norm(dim=1) / want_out.norm(dim=1)).max() > 1e-3


def test_delphi_files_hold_exactly_the_nonzero_activations(tiny_run, tmp_path):
    from harvest import ChunkReader, open_cache
    from train.record import load_run

    cache_path, run = tiny_run
    record = load_run(run)
    sae = record.load_sae()
    res = export_run(run, "delphi", tmp_path / "dl", splits=3, progress=False)
    # delphi lists the latents folder for its modules when given none: only module folders with a config there
    latents = tmp_path / "dl" / "latents"
    assert sorted(os.listdir(latents)) == sorted(res["modules"])
    assert all((latents / m / "config.json").is_file() for m in res["modules"])
    assert "LatentDataset" in (tmp_path / "dl" / "README.md").read_text()
    cache = open_cache(cache_path)
    C, F = cache.layout.context, sae.cfg.n_latents
    want = {l: {} for l in record.layers}  # (seq, pos, latent) -> fp16 value, straight from a dense encode
    with torch.no_grad():
        for ch in ChunkReader(cache, layers=record.layers):
            v, i = sae.encode(ch.acts[:, ch.keep].float())
            seq, pos = ch.seq[ch.keep].tolist(), ch.pos[ch.keep].tolist()
            for li, layer in enumerate(record.layers):
                h = torch.zeros(len(seq), F).scatter_(1, i[li], v[li])
                for t, j in (h > 1e-5).nonzero().tolist():
                    want[layer][(seq[t], pos[t], j)] = np.float16(h[t, j].item())
    assert res["tokens"] == int(cache.read_tokens("keep").sum())
    for layer, module in zip(record.layers, res["modules"]):
        folder = latents / module
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["cache_ctx_len"] == C and cfg["n_splits"] == 3 and cfg["model_name"]
        files = sorted(folder.glob("*.safetensors"), key=lambda p: int(p.stem.split("_")[0]))
        assert [p.stem for p in files] == [f"{s}_{e}" for s, e in res["splits"]]
        got = {}
        for p in files:
            start, end = map(int, p.stem.split("_"))
            d = load_np(str(p))
            loc = d["locations"].astype(np.int64)
            assert d["locations"].dtype == np.uint16 and d["activations"].dtype == np.float16
            assert np.array_equal(d["tokens"], cache.windows().numpy())
            assert (loc[:, 2] <= end - start).all()
            key = (loc[:, 0] * C + loc[:, 1]) * F + loc[:, 2]
            assert (np.diff(key) > 0).all()  # sorted by window, position, latent (delphi groups consecutive windows)
            for (s, q, j), a in zip(loc.tolist(), d["activations"]):
                got[(s, q, j + start)] = a
        assert got == want[layer], f"layer {layer}"


def test_delphi_with_fewer_tokens_encodes_whole_windows(tiny_run, tmp_path):
    from harvest import ChunkReader, open_cache

    cache_path, run = tiny_run
    cache = open_cache(cache_path)
    C = cache.layout.context
    res = export_run(run, "delphi", tmp_path / "dl", splits=1, tokens=2 * C + 5, progress=False)
    assert res["windows"] == 3  # ceil((2 C + 5) / C): the first three windows, whole
    kept = {
        (s, p)
        for ch in ChunkReader(cache)
        for s, p, k in zip(ch.seq.tolist(), ch.pos.tolist(), ch.keep.tolist())
        if k and s < 3
    }
    assert res["tokens"] == len(kept)
    module = tmp_path / "dl" / "latents" / res["modules"][0]
    d = load_np(str(next(module.glob("*.safetensors"))))
    assert d["tokens"].shape == (3, C) and np.array_equal(d["tokens"], cache.windows().numpy()[:3])
    found = {(int(s), int(p)) for s, p, _ in d["locations"]}
    assert found == kept  # every kept token of those windows has its k activations, no other token has any
    assert json.loads((module / "config.json").read_text())["n_windows"] == 3


def test_model_card_names_the_base_model_and_library():
    from train.export import base_model

    assert base_model(
        {"model": {"name": "EleutherAI/pythia-70m", "identity": {"hub_id": "EleutherAI/pythia-70m"}}}
    ) == ("EleutherAI/pythia-70m")
    assert base_model({"model": {"name": "gemma-3-270m", "identity": {"embedded": "gemma-3-270m"}}}) == (
        "google/gemma-3-270m"
    )
    assert base_model({"model": {"name": "/some/folder", "identity": {}}}) is None


# ---------------------------------------------------------------------------------------------
# the command and its refusals


def run_train_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    return run_cli(argv, capsys, prog="train")


def one_line_error(code: int, err: str, fragment: str) -> None:
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], err


def test_export_cli_and_its_one_line_refusals_before_any_work(tiny_run, tmp_path, capsys, monkeypatch):
    _, run = tiny_run
    code, out, err = run_train_cli(["export", run, "--format", "saelens", "--out", tmp_path / "ok"], capsys)
    assert code == 0 and "exported saelens" in out and (tmp_path / "ok" / "README.md").is_file(), err
    # again into the same folder: a previous export is replaced
    assert run_train_cli(["export", run, "--format", "saelens", "--out", tmp_path / "ok"], capsys)[0] == 0

    no_sae = tmp_path / "no_sae"
    no_sae.mkdir()
    shutil.copy(run / "config.json", no_sae)
    lens_run = tmp_path / "lens_run"
    shutil.copytree(run, lens_run)
    cfg = json.loads((lens_run / "config.json").read_text())
    cfg["cache"]["lens"] = {"source": "lenses/x", "params_sha256": "0" * 64}
    (lens_run / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("not an export")
    cases = [
        (["export", no_sae, "--format", "saelens"], "not a finished training run"),
        (["export", tmp_path / "nothing", "--format", "saelens"], "not a training run"),
        (["export", lens_run, "--format", "saelens"], "tuned-lens space"),
        (["export", run, "--format", "neuronpedia"], "--format 'neuronpedia' is not supported"),
        (["export", run, "--format", "saelens", "--out", "/proc/no-such-dir/x"], "choose a writable --out"),
        (["export", run, "--format", "delphi", "--out", tmp_path / "taken"], "not an export of ours"),
        (["export", run, "--format", "saelens", "--push-to-hub", "me/x", "--out", tmp_path / "h1"], "HF_HUB_OFFLINE"),
        (["export", run, "--format", "saelens", "--push-to-hub", "not a repo!", "--out", tmp_path / "h0"], "NAME/REPO"),
    ]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for argv, fragment in cases:
        one_line_error(*run_train_cli(argv, capsys)[::2], fragment)
    # "online" but nothing answers: refused before any work, with one line
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    argv = ["export", run, "--format", "delphi", "--push-to-hub", "me/x", "--out", tmp_path / "h2"]
    one_line_error(*run_train_cli(argv, capsys)[::2], "cannot reach the Hugging Face Hub")
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no stored token either
    one_line_error(*run_train_cli(argv, capsys)[::2], "needs a Hugging Face token")
    assert not any((tmp_path / n).exists() for n in ("h0", "h1", "h2")) and (tmp_path / "taken" / "mine.txt").is_file()
    assert not list(tmp_path.glob(".h*"))  # no temporary folder left behind
