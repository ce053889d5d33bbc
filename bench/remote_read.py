"""Remote-read benchmark, run by hand: prints numbers, asserts nothing (not part of the test suite).

    python bench/remote_read.py [--layers 18] [--d-model 640] [--tokens 32768] [--chunk-tokens 4096]
                                [--shard-tokens 16384] [--depths 2,4,8,16] [--blocks 10000] [--repeats 2]

A real S3 protocol server (moto) on a loopback port holds a synthetic bf16 cache; then:
  1. ChunkReader over the bucket, at several prefetch depths, against the same server's raw
     `obstore.get_ranges` of the same byte ranges (one call per object with all its ranges, 16 objects in
     flight: the fastest way the client library offers to fetch exactly those bytes);
  2. the local read-through cache (`open_cache(url, local_cache=DIR)`): its first epoch (downloads) and
     second epoch (local disk) against the plain local reader over a pulled copy;
  3. opening a remote cache and reading its manifests, for a synthetic cache of --blocks blocks.
The loopback server runs in this process (Python, werkzeug): its own CPU use limits both sides alike.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_BENCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH_DIR]
sys.path.insert(0, str(_BENCH_DIR.parent))

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

import numpy as np  # noqa: E402

from bench.common import best_median, cpu_seconds, print_summary  # noqa: E402
from harvest.cache import (  # noqa: E402
    BlockManifest,
    CacheWriter,
    FileEntry,
    Layout,
    create_cache,
    meta_hash,
    open_cache,
)
from harvest.reader import ChunkReader  # noqa: E402
from harvest.stats import LayerStats  # noqa: E402
from harvest.store import open_store  # noqa: E402


def start_server() -> str:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
        AWS_ALLOW_HTTP="true",
    )
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    return "s3://bench"


def write_synthetic(url: str, args: argparse.Namespace) -> Layout:
    layout = Layout(
        n_tokens=args.tokens,
        context=1024,
        layers=tuple(range(args.layers)),
        d_model=args.d_model,
        dtype="bfloat16",
        chunk_tokens=args.chunk_tokens,
        shard_tokens=args.shard_tokens,
        block_tokens=args.shard_tokens,
        compression="none",
    )
    meta = {"fingerprint": "synthetic", "identity": {"synthetic": True}, "spec": {}, "model": {}}
    create_cache(url, meta, layout, np.zeros((args.tokens // 1024, 1024), np.int32))
    writer = CacheWriter(url)
    rng = np.random.default_rng(0)
    for b in range(layout.n_blocks):
        start, stop = layout.block_range(b)
        n = stop - start
        acts = rng.integers(0, 2**16, size=(args.layers, n, args.d_model), dtype=np.uint16)
        pos = np.arange(start, stop)
        tokens = {
            "token_ids": np.ones(n, np.int32),
            "keep": np.ones(n, bool),
            "seq": (pos // 1024).astype(np.int32),
            "pos": (pos % 1024).astype(np.int32),
        }
        writer.write_block(b, acts, tokens, LayerStats.zeros(args.layers, args.d_model))
    return layout


def reader_epoch(reader: ChunkReader, epoch: int = 0) -> int:
    return sum(c.acts.numel() * 2 + 13 * c.acts.shape[1] for c in reader.epoch(epoch))


def epoch_ranges(reader: ChunkReader) -> dict[str, list[tuple[int, int]]]:
    """The byte ranges the reader fetches in an epoch (every layer's inner chunk and the token columns), by
    object, in the reader's order."""
    cache, lay = reader.cache, reader.layout
    ranges: dict[str, list[tuple[int, int]]] = {}
    for c in reader.order(0):
        start = lay.chunk_range(int(c))[0]
        shard, inner = divmod(start, lay.shard_tokens)
        files = cache.manifests()[start // lay.block_tokens].files
        keys = [cache.shard_key("acts", (li, shard, 0)) for li in reader.layer_idx]
        keys += [cache.shard_key(n, (shard,)) for n in ("token_ids", "keep", "seq", "pos")]
        for key in keys:
            off, nbytes, _ = files[key].pieces[inner // lay.chunk_tokens]
            ranges.setdefault(key, []).append((off, off + nbytes))
    return ranges


def raw_get_ranges(url: str, reader: ChunkReader) -> int:
    """The reader's byte ranges grouped by object: one obstore.get_ranges per object (it coalesces nearby
    ranges into fewer requests), 16 objects in flight: the strongest baseline."""
    import obstore
    from obstore.store import from_url

    store, ranges = from_url(url), epoch_ranges(reader)

    def fetch(item: tuple[str, list[tuple[int, int]]]) -> int:
        key, rs = item
        got = obstore.get_ranges(store, key, starts=[a for a, _ in rs], ends=[b for _, b in rs])
        return sum(len(memoryview(g)) for g in got)

    with ThreadPoolExecutor(16) as pool:
        return sum(pool.map(fetch, ranges.items()))


def raw_single_ranges(url: str, reader: ChunkReader, in_flight: int = 32) -> int:
    """The same ranges as one ranged GET each (the reader's request pattern), `in_flight` at a time."""
    import obstore
    from obstore.store import from_url

    store = from_url(url)
    reqs = [(k, a, b) for k, rs in epoch_ranges(reader).items() for a, b in rs]

    def fetch(q: tuple[str, int, int]) -> int:
        return len(memoryview(obstore.get_range(store, q[0], start=q[1], end=q[2])))

    with ThreadPoolExecutor(in_flight) as pool:
        return sum(pool.map(fetch, reqs))


def timed(fn, repeats: int) -> tuple[list[float], float]:
    rates, cpu, wall = [], 0.0, 0.0
    for _ in range(repeats):
        c0, t = cpu_seconds(), time.perf_counter()
        n = fn()
        dt = time.perf_counter() - t
        rates.append(n / dt / 1e9)
        cpu, wall = cpu + cpu_seconds() - c0, wall + dt
    return rates, cpu / wall


def manifest_listing(url: str, n_blocks: int) -> tuple[float, float, float]:
    """Write a synthetic cache's metadata and n_blocks manifests, then time (open, list, open + parse all)."""
    layout = Layout(n_blocks * 131072, 1024, tuple(range(18)), 640, "bfloat16", 4096, 65536, 131072, "none")
    meta = {"fingerprint": "synthetic", "identity": {}, "spec": {}, "model": {}}
    create_cache(url, meta, layout, np.zeros((8, 1024), np.int32))  # windows are not read here
    store = open_store(url)
    attrs = json.loads(store.get("zarr.json"))["attributes"]["mlsae_cache"]
    cache = open_cache(url)
    files = {
        k: FileEntry(5_000_000, 0, [[i * 5242880, 5242880, "0" * 16] for i in range(16)]) for k in cache.block_keys(0)
    }

    def put(b: int) -> None:
        s, e = layout.block_range(b)
        store.put(cache.manifest_key(b), BlockManifest(b, s, e, files, meta_hash(attrs)).to_json())

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(put, range(n_blocks)))
    t = time.perf_counter()
    c = open_cache(url)
    t_open = time.perf_counter() - t
    t = time.perf_counter()
    n_listed = len([k for k in c.store.list("manifest") if k.endswith(".json") and "block-" in k])
    t_list = time.perf_counter() - t
    t = time.perf_counter()
    done = len(open_cache(url).complete_blocks())
    t_all = time.perf_counter() - t
    assert n_listed == done == n_blocks, (n_listed, done)
    return t_open, t_list, t_all


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--d-model", type=int, default=640)
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--chunk-tokens", type=int, default=4096)
    p.add_argument("--shard-tokens", type=int, default=16384)
    p.add_argument("--depths", default="2,4,8,16")
    p.add_argument("--blocks", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    bucket = start_server()
    url = f"{bucket}/cache"
    print(
        f"# remote-read benchmark: loopback S3 (moto), {args.layers} layers x d {args.d_model} x {args.tokens:,} tokens"
        f" bf16, chunk {args.chunk_tokens}, shard {args.shard_tokens}; {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.2f} (a shared machine: other processes skew timings)",
        flush=True,
    )
    t = time.perf_counter()
    write_synthetic(url, args)
    print(f"wrote the cache into the bucket in {time.perf_counter() - t:.1f} s", flush=True)
    rows: list[tuple[str, str]] = []
    cache = open_cache(url)

    print("\n== 1. reader vs raw obstore.get_ranges of the same ranges ==", flush=True)
    base_reader = ChunkReader(cache, seed=0, prefetch=8)
    raw_get_ranges(url, base_reader)  # warm the server
    raw, raw_cpu = timed(lambda: raw_get_ranges(url, base_reader), args.repeats)
    rb, rm = best_median(raw)
    single, single_cpu = timed(lambda: raw_single_ranges(url, base_reader), args.repeats)
    qb, qm = best_median(single)
    print(f"raw get_ranges          best {rb:6.3f} GB/s  median {rm:6.3f}  CPU {raw_cpu:.2f} cores")
    print(f"raw single-range GETs   best {qb:6.3f} GB/s  median {qm:6.3f}  CPU {single_cpu:.2f} cores (32 in flight)")
    rows.append(("raw obstore.get_ranges (per object)", f"{rb:.3f} GB/s best, {rm:.3f} median"))
    rows.append(("raw single-range GETs", f"{qb:.3f} GB/s best, {qm:.3f} median"))
    for depth in [int(d) for d in args.depths.split(",")]:
        reader = ChunkReader(cache, seed=0, prefetch=depth)
        xs, cpu = timed(lambda reader=reader: reader_epoch(reader), args.repeats)
        b, m = best_median(xs)
        print(
            f"reader prefetch {depth:3d}     best {b:6.3f} GB/s  median {m:6.3f}  CPU {cpu:.2f} cores  "
            f"/ get_ranges {b / rb:.2f}, / single-range {b / qb:.2f}"
        )
        rows.append((f"reader / get_ranges, prefetch {depth}", f"{b / rb:.2f} best, {m / rm:.2f} median  (>= 0.8)"))
        rows.append((f"reader / single-range GETs, prefetch {depth}", f"{b / qb:.2f} best, {m / qm:.2f} median"))
        reader.close()

    print("\n== 2. local read-through cache, second epoch vs the local reader ==", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    try:
        from harvest.cache import copy_cache

        copy_cache(open_cache(url), open_store(tmp / "pulled"))
        local = ChunkReader(open_cache(tmp / "pulled"), seed=0, prefetch=8)
        reader_epoch(local)
        loc, loc_cpu = timed(lambda: reader_epoch(local), args.repeats)
        through = ChunkReader(open_cache(url, local_cache=tmp / "lc"), seed=0, prefetch=8)
        first, _ = timed(lambda: reader_epoch(through, 0), 1)
        second, sec_cpu = timed(lambda: reader_epoch(through, 1), args.repeats)
        lb, lm = best_median(loc)
        sb, sm = best_median(second)
        print(f"local reader (pulled copy)       best {lb:6.2f} GB/s  median {lm:6.2f}  CPU {loc_cpu:.2f}")
        print(f"read-through, first epoch        {first[0]:6.3f} GB/s (downloads whole shards)")
        print(f"read-through, later epochs       best {sb:6.2f} GB/s  median {sm:6.2f}  CPU {sec_cpu:.2f}")
        print(f"read-through later epochs / local reader: best {sb / lb:.2f}, median {sm / lm:.2f}  (target >= 0.8)")
        rows.append(("read-through epoch 2 / local reader", f"{sb / lb:.2f} best, {sm / lm:.2f} median  (>= 0.8)"))
        rows.append(("read-through epoch 1", f"{first[0]:.3f} GB/s"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    if not args.blocks:
        print_summary(rows)
        return
    print(f"\n== 3. open a remote cache of {args.blocks:,} blocks and read its manifests ==", flush=True)
    t_open, t_list, t_all = manifest_listing(f"{bucket}/many", args.blocks)
    print(f"open (zarr.json)                 {t_open * 1e3:8.1f} ms")
    print(f"list manifest/ ({args.blocks:,} objects)       {t_list:8.2f} s")
    print(f"open + list + fetch and parse all manifests (what train/info do) {t_all:8.2f} s")
    rows += [
        (f"open remote cache ({args.blocks:,} blocks)", f"{t_open * 1e3:.1f} ms"),
        (f"list {args.blocks:,} manifests", f"{t_list:.2f} s"),
        (f"list + fetch + parse {args.blocks:,} manifests", f"{t_all:.2f} s"),
    ]
    print_summary(rows)


if __name__ == "__main__":
    main()
