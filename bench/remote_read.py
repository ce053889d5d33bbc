"""Remote-read benchmark, run by hand: prints numbers, asserts nothing (not part of the test suite).

    python bench/remote_read.py [--layers 18] [--d-model 640] [--tokens 32768] [--chunk-tokens 4096]
                                [--shard-tokens 16384] [--depths 8,16] [--latency-ms 20] [--blocks 10000]
                                [--repeats 2]

A real S3 protocol server (moto, `python -m moto.server`) in a SEPARATE process on a loopback port holds a
synthetic bf16 cache (so the server and the reader do not share a GIL); then:
  1. ChunkReader over the bucket at its DEFAULT settings (prefetch chosen for an object store) and at several
     prefetch depths, against two raw-obstore baselines in the same run: (a) the coalesced one:
     `obstore.get_ranges` of the epoch's byte ranges, one call per object with all its ranges, 16 objects in
     flight (the fastest way the client library offers to fetch exactly those bytes, in storage order);
     (b) the reader's own requests: the same groups of chunks in the same order, one `get_ranges` per object
     per group, at the same concurrency, without checking or copying anything;
  2. the same through a loopback proxy that adds a fixed latency to every request (--latency-ms, as a real
     bucket's time to first byte; a comma list runs one pass per latency): the proxy counts requests, their
     bytes and how many wait at once, and prints the latency bound, requests in flight x bytes per request /
     latency, next to the measured rate: a reader is latency-bound where the two meet;
  3. the local read-through cache (`open_cache(url, local_cache=DIR)`): its first epoch (downloads) and
     second epoch (local disk) against the plain local reader over a pulled copy;
  4. opening a remote cache and reading its manifests, for a synthetic cache of --blocks blocks.
The server is Python (werkzeug); its CPU use is printed next to each measurement.
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
from harvest.reader import ChunkReader, read_requests  # noqa: E402
from harvest.stats import LayerStats  # noqa: E402
from harvest.store import open_store  # noqa: E402


def start_server() -> tuple[str, int, int]:
    """moto's S3 server in its own process on a free loopback port: (bucket URL, server pid, port)."""
    import atexit
    import socket
    import subprocess
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]

    def die_with_parent() -> None:  # Linux: the server goes when this process goes, however it ends
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent)
    atexit.register(proc.terminate)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
        AWS_ALLOW_HTTP="true",
    )
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    return "s3://bench", proc.pid, port


class LatencyProxy:
    """A TCP proxy on loopback in front of the S3 server that holds back each response until `latency`
    seconds after its request arrived: a fixed time to first byte per request, as on a real bucket. HTTP/1.1
    clients send a request only once the previous response on that connection has started, so a request is
    the client's bytes that follow a response. Bounded (at most `max_connections` open, each two threads),
    loopback only, and it stops by itself after `lifetime` seconds (or `stop()`, or with the process: daemon
    threads). Counts requests, response bytes and the time requests spend waiting."""

    def __init__(self, target_port: int, latency: float, max_connections: int = 256, lifetime: float = 3600):
        import socket
        import threading

        self.target, self.latency, self.max_connections = target_port, latency, max_connections
        self.deadline = time.monotonic() + lifetime
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.open = self.requests = self.bytes = 0
        self.waiting_seconds = 0.0  # summed over requests: arrival to first response byte
        threading.Thread(target=self._accept, daemon=True, name="latency-proxy").start()

    def counters(self) -> tuple[int, int, float]:
        with self._lock:
            return self.requests, self.bytes, self.waiting_seconds

    def stop(self) -> None:
        self._stop.set()

    def _accept(self) -> None:
        import threading

        while not self._stop.is_set() and time.monotonic() < self.deadline:
            try:
                client, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            with self._lock:
                full = self.open >= self.max_connections
                self.open += not full
            if full:
                client.close()
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()
        self.sock.close()

    def _serve(self, client) -> None:
        import socket
        import threading

        state = {"since": None}  # arrival of the request waiting for its response, None between requests
        cond = threading.Lock()
        try:
            server = socket.create_connection(("127.0.0.1", self.target))
        except OSError:
            client.close()
            with self._lock:
                self.open -= 1
            return

        def upstream() -> None:
            try:
                while data := client.recv(1 << 16):
                    with cond:
                        if state["since"] is None:
                            state["since"] = time.monotonic()
                    server.sendall(data)
            except OSError:
                pass
            finally:
                try:
                    server.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

        up = threading.Thread(target=upstream, daemon=True)
        up.start()
        try:
            while data := server.recv(1 << 20):
                with cond:
                    since, state["since"] = state["since"], None
                if since is not None:  # the first bytes of a response: only after the request's latency
                    time.sleep(max(0.0, since + self.latency - time.monotonic()))
                    with self._lock:
                        self.requests += 1
                        self.waiting_seconds += time.monotonic() - since
                with self._lock:
                    self.bytes += len(data)
                client.sendall(data)
        except OSError:
            pass
        finally:
            for s in (client, server):
                s.close()
            up.join(timeout=5)
            with self._lock:
                self.open -= 1


def server_cpu(pid: int) -> float:
    """CPU seconds (user + system) the server process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


def raw_get_ranges(store, reader: ChunkReader) -> int:
    """The epoch's byte ranges grouped by object: one obstore.get_ranges per object (it coalesces touching
    ranges into one request), 16 objects in flight: the strongest baseline."""
    import obstore

    ranges = reader.byte_ranges(reader.order(0))

    def fetch(item: tuple[str, list[tuple[int, int]]]) -> int:
        key, rs = item
        got = obstore.get_ranges(store, key, starts=[a for a, _ in rs], ends=[b for _, b in rs])
        return sum(len(memoryview(g)) for g in got)

    with ThreadPoolExecutor(16) as pool:
        return sum(pool.map(fetch, ranges.items()))


def raw_reader_requests(store, reader: ChunkReader) -> int:
    """The reader's own requests: its groups of chunks in its order, one get_ranges per object per group,
    the same number of groups and objects in flight, nothing checked or copied."""
    import obstore

    order, g = reader.order(0), reader.group
    groups = [reader.byte_ranges(order[i : i + g]) for i in range(0, len(order), g)]
    io = ThreadPoolExecutor(read_requests())

    def fetch(item: tuple[str, list[tuple[int, int]]]) -> int:
        key, rs = item
        got = obstore.get_ranges(store, key, starts=[a for a, _ in rs], ends=[b for _, b in rs])
        return sum(len(memoryview(x)) for x in got)

    def group(ranges: dict[str, list[tuple[int, int]]]) -> int:
        return sum(f.result() for f in [io.submit(fetch, item) for item in ranges.items()])

    with io, ThreadPoolExecutor(max(1, -(-reader.prefetch // g))) as pool:
        return sum(pool.map(group, groups))


def timed(fn, repeats: int) -> tuple[list[float], float]:
    rates, cpu, wall = [], 0.0, 0.0
    for _ in range(repeats):
        c0, t = cpu_seconds(), time.perf_counter()
        n = fn()
        dt = time.perf_counter() - t
        rates.append(n / dt / 1e9)
        cpu, wall = cpu + cpu_seconds() - c0, wall + dt
    return rates, cpu / wall


def manifest_listing(url: str, n_blocks: int) -> dict[str, float]:
    """Write a synthetic cache's metadata and n_blocks manifests, then time opening it: the cache, its listing,
    a ChunkReader over it, one block's manifest, and fetching and parsing them all."""
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
    n_listed = len(c.listed_blocks())
    t_list = time.perf_counter() - t
    t = time.perf_counter()
    reader = ChunkReader(open_cache(url), layers=[0], prefetch=1)  # one listing + the windows manifest
    t_reader = time.perf_counter() - t
    t = time.perf_counter()
    reader.cache.manifest(n_blocks // 2)  # what the first read of one of its chunks fetches
    t_one = time.perf_counter() - t
    reader.close()
    t = time.perf_counter()
    done = len(open_cache(url).complete_blocks())
    t_all = time.perf_counter() - t
    assert n_listed == done == len(reader.chunks) * layout.chunk_tokens // layout.block_tokens == n_blocks
    return {"open": t_open, "list": t_list, "reader": t_reader, "one": t_one, "all": t_all}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--d-model", type=int, default=640)
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--chunk-tokens", type=int, default=4096)
    p.add_argument("--shard-tokens", type=int, default=16384)
    p.add_argument("--depths", default="8,16", help="prefetch depths measured besides the default")
    p.add_argument(
        "--latency-ms", default="20", help="the proxy's added latency per request (a list: one pass each; 0 = none)"
    )
    p.add_argument("--blocks", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-read-through", action="store_true")
    args = p.parse_args()
    bucket, server_pid, server_port = start_server()
    url = f"{bucket}/cache"
    print(
        f"# remote-read benchmark: loopback S3 (moto, its own process), {args.layers} layers x d {args.d_model} x "
        f"{args.tokens:,} tokens bf16, chunk {args.chunk_tokens}, shard {args.shard_tokens}; {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f} (a shared machine: other processes skew timings)",
        flush=True,
    )
    t = time.perf_counter()
    write_synthetic(url, args)
    print(f"wrote the cache into the bucket in {time.perf_counter() - t:.1f} s", flush=True)
    rows: list[tuple[str, str]] = []
    proxy: LatencyProxy | None = None

    def run(fn, stats: dict[str, float]) -> float:
        """One epoch of fn; its rate (GB/s); CPU and the proxy's counters added to `stats`."""
        s0, c0, t0 = server_cpu(server_pid), cpu_seconds(), time.perf_counter()
        p0 = proxy.counters() if proxy else (0, 0, 0.0)
        n = fn()
        dt = time.perf_counter() - t0
        p1 = proxy.counters() if proxy else (0, 0, 0.0)
        for k, v in zip(
            ("wall", "cpu", "server", "requests", "bytes", "waiting"),
            (dt, cpu_seconds() - c0, server_cpu(server_pid) - s0, *(x - y for x, y in zip(p1, p0))),
        ):
            stats[k] = stats.get(k, 0.0) + v
        return n / dt / 1e9

    def report(label: str, rates: list[float], stats: dict[str, float]) -> None:
        b, m = best_median(rates)
        wall = stats["wall"]
        print(
            f"{label:<44} best {b:6.3f} GB/s  median {m:6.3f}  CPU: reader {stats['cpu'] / wall:.2f}, "
            f"server {stats['server'] / wall:.2f} cores"
        )
        if stats.get("requests"):
            in_flight, per_request = stats["waiting"] / wall, stats["bytes"] / stats["requests"]
            wait = stats["waiting"] / stats["requests"]
            print(
                f"    {stats['requests'] / len(rates):.0f} requests per epoch, {per_request / 1e6:.2f} MB each, "
                f"{in_flight:.1f} waiting at once, {wait * 1e3:.0f} ms each: in flight x size / latency = "
                f"{in_flight * per_request / proxy.latency / 1e9:.3f} GB/s (the latency bound)"
            )

    def compare(tag: str) -> None:
        """The coalesced baseline, the reader's own requests issued raw, and the reader, at its default settings
        and at each depth, on the current endpoint. The three alternate, epoch by epoch, so that load from
        other processes hits them alike; ratios are taken per round."""
        from obstore.store import from_url

        cache = open_cache(url)  # stores made now: the endpoint in the environment now
        raw = from_url(url)  # one client for the raw requests, like the reader's (its connections are reused)
        base_reader = ChunkReader(cache, seed=0, prefetch=1)  # only its byte ranges are used (any depth: same order)
        raw_get_ranges(raw, base_reader)  # warm the server and the client's connections
        for depth in [None, *(int(d) for d in args.depths.split(",") if d)]:
            reader = ChunkReader(cache, seed=0, prefetch=depth)
            name = f"default (prefetch {reader.prefetch})" if depth is None else f"prefetch {depth}"
            reader_epoch(reader)  # the shard indexes are fetched once per reader: not part of the timing
            fns = {
                "base": lambda: raw_get_ranges(raw, base_reader),
                "raw": lambda reader=reader: raw_reader_requests(raw, reader),
                "reader": lambda reader=reader: reader_epoch(reader),
            }
            rates: dict[str, list[float]] = {k: [] for k in fns}
            stats: dict[str, dict[str, float]] = {k: {} for k in fns}
            for _ in range(args.repeats):
                for k, fn in fns.items():
                    rates[k].append(run(fn, stats[k]))
            print(f"-- {name}, groups of {reader.group}", flush=True)
            report("raw get_ranges, coalesced (baseline)", rates["base"], stats["base"])
            report("raw, the reader's own requests", rates["raw"], stats["raw"])
            report("reader", rates["reader"], stats["reader"])
            vs_base = [r / b for r, b in zip(rates["reader"], rates["base"])]
            vs_raw = [r / q for r, q in zip(rates["reader"], rates["raw"])]
            (b1, m1), (b2, m2) = best_median(vs_base), best_median(vs_raw)
            print(f"    reader / baseline {b1:.2f} best, {m1:.2f} median; / its own requests raw {b2:.2f}, {m2:.2f}")
            goal = "  (>= 0.8)" if depth is None else ""
            rows.append((f"reader {name} / baseline{tag}", f"{b1:.2f} best, {m1:.2f} median{goal}"))
            rows.append((f"  baseline{tag}", "{:.3f} GB/s best, {:.3f} median".format(*best_median(rates["base"]))))
            reader.close()
        base_reader.close()

    print("\n== 1. reader vs raw obstore requests of the same byte ranges ==", flush=True)
    compare("")
    for latency_ms in [float(x) for x in args.latency_ms.split(",") if float(x) > 0]:
        print(f"\n== 2. the same through a proxy adding {latency_ms:g} ms to every request ==", flush=True)
        proxy = LatencyProxy(server_port, latency_ms / 1e3)
        direct = os.environ["AWS_ENDPOINT_URL"]
        os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{proxy.port}"
        try:
            compare(f", +{latency_ms:g} ms")
        finally:
            os.environ["AWS_ENDPOINT_URL"] = direct
            proxy.stop()
            proxy = None

    if not args.skip_read_through:
        read_through_section(url, args, rows)
    finish(bucket, args, rows)


def read_through_section(url: str, args: argparse.Namespace, rows: list[tuple[str, str]]) -> None:
    print("\n== 3. local read-through cache, second epoch vs the local reader ==", flush=True)
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


def finish(bucket: str, args: argparse.Namespace, rows: list[tuple[str, str]]) -> None:
    if not args.blocks:
        print_summary(rows)
        return
    print(f"\n== 4. open a remote cache of {args.blocks:,} blocks and read its manifests ==", flush=True)
    t = manifest_listing(f"{bucket}/many", args.blocks)
    print(f"open (zarr.json)                                      {t['open'] * 1e3:8.1f} ms")
    print(f"list manifest/ ({args.blocks:,} objects)                      {t['list']:8.2f} s")
    print(f"ChunkReader over it (listing + windows manifest)      {t['reader']:8.2f} s")
    print(f"one block's manifest, fetched and parsed on first read {t['one'] * 1e3:8.1f} ms")
    print(f"open + list + fetch and parse all manifests (info, verify, harvest run's resume) {t['all']:8.2f} s")
    rows += [
        (f"open remote cache ({args.blocks:,} blocks)", f"{t['open'] * 1e3:.1f} ms"),
        (f"list {args.blocks:,} manifests", f"{t['list']:.2f} s"),
        (f"ChunkReader open ({args.blocks:,} blocks)", f"{t['reader']:.2f} s"),
        ("one manifest on first read", f"{t['one'] * 1e3:.1f} ms"),
        (f"list + fetch + parse {args.blocks:,} manifests", f"{t['all']:.2f} s"),
    ]
    print_summary(rows)


if __name__ == "__main__":
    main()
