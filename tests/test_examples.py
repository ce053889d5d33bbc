"""Max-activating examples (analyze/examples.py) against a brute-force dense computation, ties included; two
ranks == one; resume == uninterrupted; the static browser (analyze/browser.py) and the CLI's one-line errors."""

from __future__ import annotations

import html.parser
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import harvest_and_train, run_cli
from safetensors.torch import load_file

from analyze.examples import ExampleAccumulator, TopExamples, run_examples

# ---------------------------------------------------------------------------------------------
# brute force: a dense h [L, T, F] and plain sorting, straight from the definitions


def dense(values: torch.Tensor, indices: torch.Tensor, n_latents: int) -> torch.Tensor:
    v = torch.where(values > 1e-3, values, 0.0)
    return torch.zeros(*values.shape[:2], n_latents).scatter_add_(2, indices.long(), v)


def brute_tops(h: torch.Tensor, where: list[int], top: int) -> tuple[dict, dict]:
    """({latent: [(value, where, layer)]} over all layers (a token's max, lowest layer on ties),
    {(layer, latent): [(value, where)]}), each sorted by value desc, then where, then layer."""
    L, T, F = h.shape
    overall, per_layer = {}, {}
    for j in range(F):
        rows = []
        for t in range(T):
            col = h[:, t, j].tolist()
            m = max(col)
            if m > 0:
                rows.append((-m, where[t], col.index(m)))  # index(): the lowest layer among equal maxima
        overall[j] = [(-a, w, l) for a, w, l in sorted(rows)[:top]]
        for l in range(L):
            rows = sorted((-float(h[l, t, j]), where[t]) for t in range(T) if h[l, t, j] > 0)
            per_layer[(l, j)] = [(-a, w) for a, w in rows[:top]]
    return overall, per_layer


def brute_samples(h: torch.Tensor, where: list[int], samples: int) -> dict:
    """{(latent, bin): [ids]}: per latent and histogram bin, the `samples` firing (token, layer) vectors with
    the largest sample_key (ties: id asc), id = where * L + layer."""
    from analyze.examples import hist_edges, sample_key

    L, T, F = h.shape
    edges, out = hist_edges(), {}
    for layer in range(L):
        for t in range(T):
            for j in range(F):
                v = float(h[layer, t, j])
                if v > 1e-3:
                    b = min(max(int(torch.bucketize(torch.tensor(v), edges, right=True)) - 1, 0), len(edges) - 1)
                    ident = where[t] * L + layer
                    key = float(sample_key(torch.tensor([j]), torch.tensor([ident]))[0])
                    out.setdefault((j, b), []).append((-key, ident))
    return {g: [i for _, i in sorted(rows)[:samples]] for g, rows in out.items()}


def stream_samples(acc: ExampleAccumulator) -> dict:
    F, B = acc.shape[0], acc.hist.shape[1]
    ids = acc.flush_().samples.ids.view(F, B, -1)
    return {(j, b): [i for i in ids[j, b].tolist() if i >= 0] for j in range(F) for b in range(B) if ids[j, b, 0] >= 0}


def stream_tops(acc: ExampleAccumulator) -> tuple[dict, dict]:
    (F, L), C = acc.shape, acc.context
    overall = {j: [(e["value"], e["seq"] * C + e["pos"], e["layer_pos"]) for e in acc.examples(j)] for j in range(F)}
    per_layer = {
        (l, j): [(e["value"], e["seq"] * C + e["pos"]) for e in acc.examples(j, l)] for l in range(L) for j in range(F)
    }
    return overall, per_layer


def synthetic(L=3, T=60, k=3, F=7, levels=(0.5, 1.0, 2.0), seed=0):
    """TopK-shaped codes whose values come from a few levels: many exact ties, also across layers."""
    g = torch.Generator().manual_seed(seed)
    indices = torch.rand(L, T, F, generator=g).argsort(-1)[..., :k]
    values = torch.tensor(levels)[torch.randint(len(levels), (L, T, k), generator=g)]
    values[torch.rand(L, T, k, generator=g) < 0.15] = 0.0
    return values, indices


def test_streamed_tops_equal_brute_force_with_ties_in_any_batching_and_order():
    L, T, F, top, C = 3, 60, 7, 5, 10
    values, indices = synthetic(L, T, F=F)
    seq, pos = torch.arange(T) // C, torch.arange(T) % C
    want = brute_tops(dense(values, indices, F), (seq * C + pos).tolist(), top)
    want_samples = brute_samples(dense(values, indices, F), (seq * C + pos).tolist(), 2)
    results = []
    for batches in ([slice(0, T)], [slice(s, s + 7) for s in range(0, T, 7)]):
        for perm in (torch.arange(T), torch.randperm(T, generator=torch.Generator().manual_seed(1))):
            acc = ExampleAccumulator.zeros(F, L, top, C, samples=2)
            for b in batches:
                p = perm[b]
                acc.update(values[:, p], indices[:, p], seq[p], pos[p])
            got = stream_tops(acc)
            assert got == want
            assert stream_samples(acc) == want_samples  # the quantile samples: any batching, any order
            results.append(acc)
    h = dense(values, indices, F)
    for acc in results:
        assert int(acc.tokens) == T
        assert torch.equal(acc.fires, (h > 0).sum(1))
        assert torch.allclose(acc.mass, h.sum(1).T.double())
        assert int(acc.hist.sum()) == int((h > 0).sum())
    # the ties really are there: equal values at the cut and across layers of one token
    assert any(len({v for v, *_ in rows}) < len(rows) for rows in want[0].values())


def test_top_examples_merge_keeps_the_total_order_and_ignores_entries_below_the_threshold():
    t = TopExamples.empty(2, 3)
    t.merge_(torch.tensor([0, 0, 0, 1]), torch.tensor([1.0, 2.0, 1.0, 5.0]), torch.tensor([7, 3, 4, 9]))
    assert t.values[0].tolist() == [2.0, 1.0, 1.0] and t.ids[0].tolist() == [3, 4, 7]
    t.merge_(torch.tensor([0, 0]), torch.tensor([1.0, 0.5]), torch.tensor([5, 1]))  # 1.0 with id 5 beats id 7
    assert t.ids[0].tolist() == [3, 4, 5] and t.values[1, 1] == -math.inf and t.ids[1].tolist() == [9, -1, -1]


# ---------------------------------------------------------------------------------------------
# end to end on a tiny cache + SAE


@pytest.fixture(scope="module")
def tiny_run(neox_dir, tmp_path_factory) -> tuple[Path, Path]:
    return harvest_and_train(tmp_path_factory.mktemp("examples"), neox_dir)


def dense_pass(cache_path: Path, run: Path, rows: int = 4096):
    """Every kept token, chunk by chunk (the same sub-batches the stream encodes, so the floats match
    bit for bit), as a dense h [L, T, F] with each token's position id."""
    from harvest import ChunkReader, open_cache
    from train import load_sae

    cache, sae = open_cache(cache_path), load_sae(run)
    layers = json.loads((run / "config.json").read_text())["layers"]
    hs, where, tok = [], [], []
    with torch.no_grad():
        for ch in ChunkReader(cache, layers=layers):
            x = ch.acts[:, ch.keep].float()
            for s in range(0, x.shape[1], rows):
                v, i = sae.encode(x[:, s : s + rows])
                hs.append(dense(v, i, sae.cfg.n_latents))
            where += (ch.seq[ch.keep].long() * cache.layout.context + ch.pos[ch.keep].long()).tolist()
            tok += ch.token_ids[ch.keep].tolist()
    return torch.cat(hs, 1), where, tok, cache, sae


def test_examples_of_a_real_sae_equal_the_dense_computation_and_the_browser_shows_them(tiny_run, tmp_path):
    cache_path, run = tiny_run
    out = tmp_path / "latents"
    res = run_examples(run, tokens=None, top=6, context=3, out_dir=out, device="cpu", progress=False, rows=100)
    h, where, tok, cache, _sae = dense_pass(cache_path, run, rows=100)
    _L, T, F = h.shape
    assert res["tokens"] == T == int(cache.read_tokens("keep").sum())

    t = load_file(str(out / "examples.safetensors"))
    acc = ExampleAccumulator.from_tensors({k: t[k] for k in ExampleAccumulator.zeros(1, 1, 1, 1).to_tensors()}, 32)
    assert stream_tops(acc) == brute_tops(h, where, 6)
    assert torch.allclose(t["density"], (h > 0).sum(1).double() / T)
    assert torch.allclose(t["p_layer_given_latent"], torch.nan_to_num(h.sum(1).T / h.sum((0, 1)).unsqueeze(1)).double())
    # the stored token of every example is the cache's token at (seq, pos)
    windows = cache.windows()
    tok_at = dict(zip(where, tok))
    for j in range(F):
        for e in acc.examples(j):
            assert int(windows[e["seq"], e["pos"]]) == tok_at[e["seq"] * 32 + e["pos"]]

    # the browser: every latent in the index and in its shard, its top examples as kept, each context's
    # shading equal to the dense activations, contexts decoded with the cache's tokenizer
    from analyze.browser import shard_of

    b = out / "browser"
    index = read_data(b / "data" / "index.js")
    assert [r[0] for r in index["rows"]] == list(range(F))
    tokens = read_data(b / "data" / "tokens.js")
    from transformers import AutoTokenizer

    tk = AutoTokenizer.from_pretrained(cache.meta["model"]["path"])
    L = len(index["layers"])
    col = {w: i for i, w in enumerate(where)}
    checked = 0
    for j in range(F):
        shard = read_data(b / "data" / f"shard-{shard_of(j)}.js")
        rec = shard["latents"][j - shard["first"]]
        top = acc.examples(j)
        assert [rec["c"][i][:3] for i in rec["t"]] == [
            [e["seq"], e["pos"], e["layer_pos"]] for e in top[: len(rec["t"])]
        ]
        assert rec["f"] == int(t["hist"][j].sum()) and len(rec["p"]) == L
        for seq, pos, layer_pos, value, at, toks, acts in rec["c"]:
            ids = decode_ids(toks, tokens["w"])
            assert ids[at] == int(windows[seq, pos])
            assert tokens["t"][str(ids[at])] == tk.decode([ids[at]]) or ids[at] == 0
            shown = {i: v for i, v in acts} | {at: value}
            for i in range(len(ids)):  # every token's shading is the latent's activation there (or 0)
                c = col.get(seq * 32 + pos - at + i)
                want = None if c is None else float(h[layer_pos, c, j])
                got = shown.get(i, 0.0)
                if want is None:  # not encoded (a special token): shown as such
                    assert got == -1
                else:
                    assert got == pytest.approx(want, rel=5e-3, abs=1e-6), (j, seq, pos, i)
                checked += 1
        # quantile groups: strongest first, their counts the histogram's, each sample's value inside its range
        assert sum(g[4] for g in rec["q"]) == rec["f"]
        for lo, hi, _q_lo, _q_hi, _count, refs in rec["q"]:
            for i in refs:
                v = rec["c"][i][3]
                assert lo * (1 - 1e-3) <= v and (hi is None or v < hi * (1 + 1e-3)), (j, lo, hi, v)
    assert checked > 100
    for name in [p.relative_to(b) for p in b.rglob("*.html")]:
        parser = LinkCollector()
        parser.feed((b / name).read_text())
        assert parser.links
        for href in parser.links:
            assert not href.startswith(("/", "file:", "http")), (name, href)
            target = href.split("#")[0] or Path(name).name  # "#12": this page
            assert (b / Path(name).parent / target).is_file(), (name, href)


def read_data(path: Path):
    """The JSON value of a browser data file (one call MLSAE.<name>(...))."""
    text = path.read_text(encoding="ascii")
    body = text[text.index("(") + 1 : text.rindex(")")]
    if path.name.startswith("shard-"):
        body = body[body.index(",") + 1 :]
    return json.loads(body)


def decode_ids(s: str, width: int) -> list[int]:
    from analyze.browser import B64

    return [sum(B64.index(s[i + k]) << (6 * (width - 1 - k)) for k in range(width)) for i in range(0, len(s), width)]


def test_heldout_examples_come_only_from_the_runs_heldout_tokens(tiny_run, tmp_path):
    from harvest import ChunkReader, open_cache
    from train.record import load_run

    cache_path, run = tiny_run
    record = load_run(run)
    res = run_examples(run, top=4, out_dir=tmp_path / "h", device="cpu", progress=False, browser=False, heldout=True)
    cache = open_cache(cache_path)
    held = set()
    for ch in ChunkReader(cache, chunks=record.heldout.chunks):
        m = ch.keep & record.heldout.mask(ch.seq.long())
        held |= set(zip(ch.seq[m].tolist(), ch.pos[m].tolist()))
    assert res["tokens"] == len(held) > 0 and "held out" in res["tokens_used"]
    t = load_file(str(tmp_path / "h" / "examples.safetensors"))
    acc = ExampleAccumulator.from_tensors({k: t[k] for k in ExampleAccumulator.zeros(1, 1, 1, 1).to_tensors()}, 32)
    found = [(e["seq"], e["pos"]) for j in range(acc.shape[0]) for e in acc.examples(j)]
    assert found and set(found) <= held


class LinkCollector(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links = []

    def handle_starttag(self, tag, attrs):
        self.links += [v for k, v in attrs if k in ("href", "src") and v is not None]


def test_an_interrupted_pass_resumes_to_the_uninterrupted_result(tiny_run, tmp_path, monkeypatch):
    import train.latents

    _cache_path, run = tiny_run
    full = run_examples(run, top=4, out_dir=tmp_path / "full", device="cpu", progress=False, browser=False, rows=64)
    real = train.latents.iter_latents

    def dies_after_three_chunks(*a, **kw):
        ends = 0
        for b in real(*a, **kw):
            yield b
            ends += b.last_of_chunk
            if ends == 3:
                raise KeyboardInterrupt

    monkeypatch.setattr(train.latents, "iter_latents", dies_after_three_chunks)
    with pytest.raises(KeyboardInterrupt):
        kw = dict(top=4, out_dir=tmp_path / "cut", device="cpu", progress=False, browser=False, rows=64)
        run_examples(run, checkpoint_seconds=0, **kw)
    assert (tmp_path / "cut" / ".examples-work" / "rank0.safetensors").is_file()
    monkeypatch.setattr(train.latents, "iter_latents", real)
    notes = []
    again = run_examples(run, log=notes.append, **kw)
    assert again["resumed"] and "resuming: 3 chunks" in notes[0]
    a, b = (load_file(str(tmp_path / d / "examples.safetensors")) for d in ("full", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again["tokens"] == full["tokens"] and not (tmp_path / "cut" / ".examples-work").exists()


DDP_SCRIPT = """
import sys
from analyze.examples import run_examples
run_examples(sys.argv[1], top=5, out_dir=sys.argv[2], device="cpu", progress=False, browser=False, rows=64)
"""


def test_two_ranks_under_torchrun_give_what_one_gives(tiny_run, tmp_path):
    _cache_path, run = tiny_run
    run_examples(run, top=5, out_dir=tmp_path / "one", device="cpu", progress=False, browser=False, rows=64)
    script = tmp_path / "ddp_examples.py"
    script.write_text(DDP_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run(
        [str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", "2", "--master-port", str(port)]
        + [str(script), str(run), str(tmp_path / "two")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    two = json.loads((tmp_path / "two" / "examples.json").read_text())
    one = json.loads((tmp_path / "one" / "examples.json").read_text())
    assert two["world_size"] == 2 and two["tokens"] == one["tokens"]
    a, b = (load_file(str(tmp_path / d / "examples.safetensors")) for d in ("one", "two"))
    for k in a:
        if k in ("mass", "p_layer_given_latent", "mean_layer", "var_layer"):  # float sums: another order
            assert torch.allclose(a[k], b[k], rtol=1e-9, equal_nan=True), k
        else:
            assert torch.equal(a[k], b[k]), k


def run_analyze(argv: list[str], capsys) -> tuple[int, str, str]:
    return run_cli(argv, capsys, prog="analyze")


def test_cli_writes_the_browser_and_bad_input_is_one_line(tiny_run, tmp_path, capsys):
    _cache_path, run = tiny_run
    from analyze.report import report_folder

    folder = tmp_path / "analysis"
    code, out, err = run_analyze(["examples", "--sae", run, "--top", "3", "--out", folder / "latents"], capsys)
    assert code == 0, err
    assert "latent browser: file://" in out and (folder / "latents" / "browser" / "index.html").is_file()
    report = report_folder(folder, sae_dirs=[run]).read_text()  # `analyze report` links the browser
    assert "href='latents/browser/index.html'" in report and "3 examples each" in report
    no_sae = tmp_path / "no_sae"
    no_sae.mkdir()
    (no_sae / "config.json").write_text((run / "config.json").read_text())
    for argv, fragment in [
        (["examples", "--sae", tmp_path], "not a training run"),
        (["examples", "--sae", no_sae], "not a finished training run"),
        (["examples", "--sae", run, "--tokens", "0"], "--tokens"),
        (["examples", "--sae", run, "--top", "0"], "--top"),
        (["examples", "--sae", run, "--samples", "0"], "--samples"),
        (["examples", "--sae", run, "--out", "/proc/no-such-dir/latents"], "choose a writable --out"),
    ]:
        code, out, err = run_analyze(argv, capsys)
        lines = [l for l in err.strip().splitlines() if l.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], err


# ---------------------------------------------------------------------------------------------
# a browser that can be shared: a hostile vocabulary, permissions, no machine paths, real Chromium


@pytest.fixture(scope="module")
def hostile_browser(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """`analyze examples` (the CLI) under umask 022 on a tiny model whose vocabulary holds bidi overrides,
    zero-width characters, controls and HTML: (root of everything made, the browser, paths to look for)."""
    from tiny import hostile_documents, make_neox, write_text_folder
    from transformers import AutoTokenizer
    from typer.testing import CliRunner

    from analyze.cli import app

    root = tmp_path_factory.mktemp("hostile")
    docs = hostile_documents()
    model = make_neox(root / "model", docs=docs)
    data = write_text_folder(root / "docs", docs)
    _cache, run = harvest_and_train(root, model, dataset=str(data))
    tok = AutoTokenizer.from_pretrained(model)
    vocab = [tok.decode([i]) for i in range(len(tok))]
    for ch in "\u202e\u200b\ufeff":  # the tokenizer really holds these as (parts of) tokens
        assert any(ch in t for t in vocab), hex(ord(ch))
    old = os.umask(0o022)
    try:
        res = CliRunner().invoke(app, ["examples", "--sae", str(run), "--top", "6", "--out", str(root / "latents")])
        assert res.exit_code == 0, res.output
    finally:
        os.umask(old)
    return root, root / "latents" / "browser", [str(root), str(Path.home()), os.getcwd(), "file://"]


HIDDEN = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


def test_the_browser_can_be_shared_and_shows_every_token_as_what_it_is(hostile_browser):
    import stat
    import unicodedata

    root, b, paths = hostile_browser
    files = [p for p in (root / "latents").rglob("*")]
    assert len([p for p in files if p.is_file()]) > 8
    for p in [root / "latents", *files]:  # readable by others: 0644 files, 0755 folders under umask 022
        mode = stat.S_IMODE(p.lstat().st_mode)
        assert mode == (0o755 if p.is_dir() else 0o644), (p, oct(mode))
    for p in b.rglob("*"):
        if not p.is_file():
            continue
        text = p.read_bytes().decode("utf-8")
        for path in paths:  # no path of this machine, no absolute link
            assert path not in text, (p, path)
        raw = {c for c in text if unicodedata.category(c) in HIDDEN and c != "\n"}
        raw |= {c for c in text if unicodedata.category(c) == "Zs" and c != " "}
        assert not raw, (p, [hex(ord(c)) for c in raw])
    # the hostile tokens are there as data (JSON escapes), and the pages show them as tags
    tokens = read_data(b / "data" / "tokens.js")["t"]
    assert any("\u202e" in t for t in tokens.values()) and any("\u200b" in t for t in tokens.values())
    pages = "".join(p.read_text() for p in (b / "latents").glob("*.html"))
    assert "U+202E" in pages or "U+200B" in pages or "U+2066" in pages
    assert "&lt;script" in pages and "<script>alert" not in pages


def test_visible_shows_hidden_characters_as_tags_and_isolates_nothing_raw():
    from analyze.browser import _e, visible

    for s in ["\u202e and which", "zero\u200bwidth", "\x00nul", "\ufeff", "a\u2028b", "\u00a0", "<b>&amp;</b>"]:
        out = visible(s) + _e(s)
        assert not set(out) & set("\u202e\u200b\x00\ufeff\u2028\u00a0"), repr(out)
        assert "<b>" not in out
    assert "U+202E" in visible("\u202e") and "RIGHT-TO-LEFT OVERRIDE" in visible("\u202e")
    assert visible(" a\n", chip=True).count("ws") == 2


def chromium() -> str | None:
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def dump_dom(url: str) -> str:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000", "--dump-dom", url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout


@pytest.mark.skipif(chromium() is None, reason="needs a headless chromium (apt-get install chromium)")
def test_the_browser_renders_in_chromium_from_disk_and_from_a_static_web_server(hostile_browser):
    import functools
    import http.server
    import threading
    import unicodedata

    from analyze.browser import shard_of

    _root, b, _paths = hostile_browser
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(b))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        index = read_data(b / "data" / "index.js")
        j = index["rows"][len(index["rows"]) // 2][0]
        for base in (b.as_uri(), f"http://127.0.0.1:{server.server_address[1]}"):
            dom = dump_dom(f"{base}/index.html")
            assert 'data-ready="1"' in dom and f'href="latents/{shard_of(j)}.html#{j}"' in dom, base
            dom = dump_dom(f"{base}/index.html#q=%23{j}")  # a search by number, kept in the address
            first = dom.split("<tbody>", 1)[1].split("</tr>", 1)[0]
            assert f'href="latents/{shard_of(j)}.html#{j}"' in first, base
            dom = dump_dom(f"{base}/latents/{shard_of(j)}.html#{j}")
            assert f'data-ready="{j}"' in dom and f"Latent {j}" in dom, base
            assert "Examples by activation quantile" in dom and "<svg" in dom
            assert not {c for c in dom if unicodedata.category(c) in HIDDEN and c != "\n"}
    finally:
        server.shutdown()


def test_atomic_writes_follow_the_umask(tmp_path):
    import stat

    from harvest.atomic import atomic_write_text, fresh_folder

    old = os.umask(0o022)
    try:
        for umask, file_mode, dir_mode in [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700), (0o002, 0o664, 0o775)]:
            os.umask(umask)
            f = tmp_path / f"f{umask:o}.txt"
            atomic_write_text(f, "x")
            d = fresh_folder(tmp_path, f"d{umask:o}")
            assert stat.S_IMODE(f.stat().st_mode) == file_mode and stat.S_IMODE(d.stat().st_mode) == dir_mode
    finally:
        os.umask(old)


@pytest.mark.skipif(__import__("shutil").which("node") is None, reason="needs node to run the browser's script")
def test_the_scripts_show_hidden_characters_as_tags_and_format_numbers(tmp_path):
    from analyze.browser_assets import COMMON_JS

    cases = ["\u202e and which", "zero\u200bwidth", "\x00nul\x1b[31m", "\ufeff\u2066x\u2069", "a\u2028b\u00a0", "<b>&"]
    script = tmp_path / "t.js"
    script.write_text(
        "var window={};" + COMMON_JS + f"console.log(JSON.stringify([{json.dumps(cases)}.map(function(s){{"
        "return tokHtml(s)}), [170.4, 16.5, 2, 0.000123, -178.2].map(function(v){return num(v)})]))"
    )
    html_out, nums = json.loads(subprocess.run(["node", str(script)], capture_output=True, text=True).stdout)
    hidden = "\u202e\u200b\x00\x1b\ufeff\u2066\u2069\u2028\u00a0"
    for s, out in zip(cases, html_out):
        assert not set(out) & set(hidden) and "<b>" not in out, (s, out)
    assert "U+202E" in html_out[0] and "U+200B" in html_out[1] and "U+0000" in html_out[2] and "U+2066" in html_out[3]
    assert nums == ["170", "16.5", "2", "0.000123", "-178"]
