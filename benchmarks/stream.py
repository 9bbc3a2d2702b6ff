"""Training from the DVC remote: ``python -m benchmarks.stream`` -> ``bench/stream.json``, ``.md``.

Builds ``--scale`` x FashionMNIST train shards (uint8 by default, shards of
``--shard-size``) in a scratch git + DVC repository, ``dvc add``s them, pushes
them to a local-folder remote and to the tests' SSH server (tests/sshd.py),
and clones the repository without pulling. Then one epoch per configuration,
``loader.shuffle_window`` ``--window``: the shards pulled (the workspace
folder, pages dropped from the page cache first) and streamed from each remote
with the cache limited to 100 %, 25 % and 10 % of the data.

The epoch is the trainer's own read path (``trainer.run``'s loaders:
``EpochBatchSampler``, ``StreamedDataset`` or ``ShardDataset``, the fetcher)
with the model's step replaced by a fixed ``--step-ms`` per batch, so the
figures are the data path's, not this machine's CNN speed: the training reads
``batch bytes / step`` per second, and the data wait is the time ``next()`` on
the loader blocks. Reported: seconds, bytes fetched / data size, the cache's
peak disk use (measured after every change), the data-wait fraction over the
whole epoch and after the first window is in.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.cold import build_shards
from benchmarks.report import add_run_options, conditions_text, run_conditions, scratch_parent, write_results
from benchmarks.scalecsv import load_idx_split
from pipeline.manifest import read_manifest
from pipeline.params import LoaderParams
from pipeline.shardcache import ShardCache
from tests.repo_copy import dvc, run
from tests.sshd import start_sshd
from trainer.data import ShardDataset
from trainer.loader import EpochBatchSampler, make_loader, resolve_settings
from trainer.rank_split import RankBatches
from trainer.stream import Fetcher, PlannedLoader, StreamedDataset, open_split, plan_ahead
from trainer.verify import validate_split

GIT = ["git", "-c", "user.email=b@b", "-c", "user.name=bench"]
MB = 2**20
# A read-only HTTP server for a DVC remote folder, each response throttled to RATE bytes/s.
_HTTP_SERVER = """
import os, re, sys, time, functools
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
folder, rate = sys.argv[1], float(sys.argv[2])
class Throttled(SimpleHTTPRequestHandler):
    def send_head(self):  # byte ranges too, as fsspec's HTTP reader asks for them
        m = re.fullmatch(r"bytes=(\\d+)-(\\d*)", self.headers.get("Range", ""))
        path = self.translate_path(self.path)
        if not m or not os.path.isfile(path):
            return super().send_head()
        size = os.path.getsize(path)
        start, end = int(m[1]), min(int(m[2]) if m[2] else size - 1, size - 1)
        f = open(path, "rb")
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self.left = end - start + 1
        return f
    def copyfile(self, source, out):
        left = getattr(self, "left", None)
        start, sent = time.perf_counter(), 0
        while chunk := source.read(1 << 18 if left is None else min(1 << 18, left - sent)):
            try:
                out.write(chunk)
            except (BrokenPipeError, ConnectionResetError):  # the reader had the bytes it wanted
                return
            sent += len(chunk)
            ahead = sent / rate - (time.perf_counter() - start)
            if ahead > 0:
                time.sleep(ahead)
    def log_message(self, *args):
        pass
server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Throttled, directory=folder))
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def _drop_page_cache(folder: Path) -> None:
    for p in folder.iterdir():
        with open(p, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def _epoch(loader, step_s: float, first_window_batches: int) -> dict:
    waits, start = [], time.perf_counter()
    it = iter(loader)
    while True:
        t0 = time.perf_counter()
        try:
            next(it)
        except StopIteration:
            break
        waits.append(time.perf_counter() - t0)
        time.sleep(step_s)  # the training step
    seconds = time.perf_counter() - start
    after = waits[first_window_batches:]
    after_s = seconds - sum(waits[:first_window_batches]) - step_s * min(first_window_batches, len(waits))
    return {
        "seconds": round(seconds, 2),
        "data_wait_fraction": round(sum(waits) / seconds, 4),
        "data_wait_after_first_window": round(sum(after) / max(after_s, 1e-9), 4),
    }


def _settings(window: int, batch: int, limit_mb: float | None):
    params = LoaderParams(batch_size=batch, shuffle_window=window, pin_memory=False, cache_limit_mb=limit_mb)
    return params, resolve_settings(params, torch.device("cpu"))


def run_config(
    split_dir: Path,
    *,
    window: int,
    batch: int,
    step_s: float,
    limit_mb: float | None,
    cache_dir: Path | None,
    seed: int = 42,
) -> dict:
    params, settings = _settings(window, batch, limit_mb)
    split = open_split(split_dir, expected_split="train", verify="header") if cache_dir else None
    if split is None:
        split = validate_split(split_dir, expected_split="train")
        _drop_page_cache(split_dir)
    sizes = [s.num_samples for s in split.shards]
    batches = RankBatches(
        EpochBatchSampler(
            sum(sizes), batch, shuffle=True, seed=seed, shard_sizes=sizes, shuffle_window=window
        ),
        0,
        1,
    )
    first_window = -(-sum(sorted(sizes, reverse=True)[:window]) // batch)
    data_bytes = sum(s.bytes for s in split.manifest.shards)
    if cache_dir is None:
        row = _epoch(make_loader(ShardDataset(split), batches, settings), step_s, first_window)
        return {**row, "fetched_over_data": 0.0, "peak_cache_mb": 0.0, "data_mb": round(data_bytes / MB, 1)}
    shutil.rmtree(cache_dir, ignore_errors=True)
    limit = None if limit_mb is None else int(limit_mb * MB)
    cache = ShardCache(cache_dir, limit)
    fetcher = Fetcher(cache, plan_ahead(params, split, limit))
    try:
        dataset = StreamedDataset(split, fetcher, "header")
        loader = PlannedLoader(make_loader(dataset, batches, settings), batches, dataset)
        row = _epoch(loader, step_s, first_window)
    finally:
        fetcher.close()
    return {
        **row,
        "fetched_over_data": round(cache.stats.fetched_bytes / data_bytes, 3),
        "peak_cache_mb": round(cache.stats.peak_bytes / MB, 1),
        "limit_mb": None if limit is None else round(limit / MB, 1),
        "data_mb": round(data_bytes / MB, 1),
    }


def build_repo(work: Path, idx: Path, scale: int, shard_size: int, dtype: str) -> Path:
    repo = work / "producer"
    repo.mkdir()
    run(["git", "init", "-q"], repo)
    dvc(repo, "init", "-q")
    images, labels = load_idx_split(idx, "train")
    build_shards(repo / "data/tensors/train", images, labels, scale, shard_size, "train", dtype)
    dvc(repo, "add", "data/tensors/train")
    run([*GIT, "add", "-A"], repo)
    run([*GIT, "commit", "-qm", "shards"], repo)
    return repo


def with_conditions(rows: list[dict], conditions: dict, earlier: list[dict] | None = None) -> list[dict]:
    """This run's rows, each with this run's conditions; with ``earlier`` (``--append``), merged
    after the earlier rows of other remotes, which keep theirs (:func:`merge_rows`)."""
    stamped = [{**row, "conditions": conditions} for row in rows]
    return stamped if earlier is None else merge_rows(earlier, stamped)


def earlier_rows(doc: dict) -> list[dict]:
    """A results file's rows, each with the conditions it was measured under: a file from before
    rows carried them holds one run's rows and its conditions, unless it was appended to (then
    they are not known, and stay unrecorded). ``--append`` merges these; the page names them."""
    known = None if doc["settings"].get("append") else doc.get("conditions")
    return [
        row if row.get("conditions") or known is None else {**row, "conditions": known} for row in doc["rows"]
    ]


def merge_rows(earlier: list[dict], rows: list[dict]) -> list[dict]:
    """``--append``: the earlier file's rows of remotes this run did not measure, then this run's
    rows (its pulled row left out: the pulled row stays the first run's). Every row keeps the
    conditions it was measured under."""
    ran = {r["remote"] for r in rows[1:]}
    return [r for r in earlier if r["remote"] not in ran] + rows[1:]


def _machine_line(r: dict) -> str:
    """The conditions of each run whose rows the page shows (:func:`earlier_rows`), naming the rows
    when there are several."""
    runs: dict[str, list[str]] = {}
    for row in earlier_rows(r):
        conditions = row.get("conditions")
        text = conditions_text(conditions) if conditions else "conditions not recorded"
        names = runs.setdefault(text, [])
        if row["remote"] not in names:
            names.append(row["remote"])
    if len(runs) == 1:
        return f"Machine: {next(iter(runs))}."
    return (
        "Machine, by the rows each run measured: "
        + "; ".join(f"{', '.join(f'`{n}`' for n in names)}: {text}" for text, names in runs.items())
        + "."
    )


def render_markdown(r: dict) -> str:
    s = r["settings"]
    lines = [
        "# Training from the DVC remote (`python -m benchmarks.stream`)",
        "",
        f"{s['scale']}x FashionMNIST train split, `prep.shard_dtype` {s['shard_dtype']}, shards of "
        f"{s['shard_size']:,} samples ({r['data_mb']:.0f} MB in {r['shards']} shards), "
        f"`loader.shuffle_window` {s['window']}, batch {s['batch']}, a training step of {s['step_ms']} ms "
        f"per batch in place of the model (the training reads {r['read_rate_mb_s']:.0f} MB/s). "
        "One epoch per row, a cold cache each time; pulled: the workspace shards with their pages dropped.",
        "",
        _machine_line(r),
        "",
        "| remote | cache limit | seconds | fetched / data | peak cache MB | limit MB | data wait "
        "| data wait after 1st window |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        limit = "-" if row.get("limit_mb") is None else f"{row['limit_mb']:.0f}"
        lines.append(
            f"| {row['remote']} | {row['cache']} | {row['seconds']:.1f} | {row['fetched_over_data']:.3f} | "
            f"{row['peak_cache_mb']:.0f} | {limit} | {row['data_wait_fraction']:.1%} | "
            f"{row['data_wait_after_first_window']:.1%} |"
        )
    lines += [
        "",
        "Data wait includes the in-process gather of each batch (0 loader workers), so the pulled row is the "
        "floor: the cost of streaming is a row's wait minus the pulled row's.",
        "",
        "Goals (issue 19): fetched / data <= 1.05 at every limit that holds two windows; the peak never "
        "above the limit; data wait < 5 % once the first window is in, on a remote at >= 4x the "
        "training's read rate.",
        "",
    ]
    if s.get("note"):
        lines += [f"Note: {s['note']}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=int, default=16)
    p.add_argument("--shard-size", type=int, default=16384)
    p.add_argument("--shard-dtype", choices=("float32", "uint8"), default="uint8")
    p.add_argument("--window", type=int, default=2)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--step-ms", type=float, default=4.0, help="the training step each batch stands for")
    p.add_argument(
        "--remotes", default="local,ssh,http", help="comma-separated: local, ssh, http (throttled, read-only)"
    )
    p.add_argument(
        "--http-rate", type=float, default=4.0, help="the HTTP remote's rate, in multiples of the read rate"
    )
    p.add_argument("--stem", default="stream", help="results file name in --out")
    p.add_argument(
        "--append", action="store_true", help="keep the rows of other remotes already in --out/--stem.json"
    )
    add_run_options(p, "16x uint8 needs ~3 GB: the shards, DVC's cache and two remotes")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="stream-", dir=scratch_parent(args.work)))
    results: dict = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    results["conditions"] = run_conditions()
    server = http = None
    try:
        repo = build_repo(work, args.idx, args.scale, args.shard_size, args.shard_dtype)
        manifest = read_manifest(repo / "data/tensors/train")
        data_mb = sum(s.bytes for s in manifest.shards) / MB
        results.update(
            data_mb=round(data_mb, 1),
            shards=len(manifest.shards),
            read_rate_mb_s=round(
                args.batch
                * manifest.shards[0].bytes
                / manifest.shards[0].num_samples
                / MB
                / (args.step_ms / 1000),
                1,
            ),
        )
        wanted = args.remotes.split(",")
        remotes = {"local folder": str(work / "storage")}
        if "ssh" in wanted:
            server = start_sshd(work / "sshd")
            os.environ["HOME"] = str(server.home)  # DVC's SSH client reads ~/.ssh/known_hosts from here
            remotes["SSH (127.0.0.1)"] = server.url(work / "ssh-storage")
        if "http" in wanted:
            rate = args.http_rate * results["read_rate_mb_s"] * MB
            http = subprocess.Popen(
                [sys.executable, "-c", _HTTP_SERVER, str(work / "storage"), str(rate)],
                stdout=subprocess.PIPE,
                text=True,
            )
            port = int(http.stdout.readline())
            remotes[f"HTTP, {rate / MB:.0f} MB/s ({args.http_rate:g}x)"] = f"http://127.0.0.1:{port}"
        step = args.step_ms / 1000
        rows = [
            {
                "remote": "pulled",
                "cache": "-",
                **run_config(
                    repo / "data/tensors/train",
                    window=args.window,
                    batch=args.batch,
                    step_s=step,
                    limit_mb=None,
                    cache_dir=None,
                ),
            }
        ]
        print(rows[-1], flush=True)
        for i, (name, url) in enumerate(remotes.items()):
            remote = f"r{i}"
            dvc(repo, "remote", "add", "-f", "-d", remote, url)
            if server is not None and url.startswith("ssh://"):
                dvc(repo, "remote", "modify", remote, "keyfile", str(server.key))
            t0 = time.perf_counter()
            if not url.startswith("http"):  # the HTTP server serves the local folder remote, read-only
                dvc(repo, "push", "-r", remote)
            push_s = time.perf_counter() - t0
            clone = work / f"clone{i}"
            run(["git", "clone", "-q", str(repo), str(clone)], work)
            shutil.copy(repo / ".dvc/config", clone / ".dvc/config")  # the remote (not committed here)
            if name == "local folder" and "local" not in wanted:
                continue
            for label, fraction in (("100 %", 1.0), ("25 %", 0.25), ("10 %", 0.10)):
                row = run_config(
                    clone / "data/tensors/train",
                    window=args.window,
                    batch=args.batch,
                    step_s=step,
                    limit_mb=data_mb * fraction,
                    cache_dir=work / "cache",
                )
                rows.append({"remote": name, "cache": label, "push_s": round(push_s, 1), **row})
                print(rows[-1], flush=True)
            shutil.rmtree(clone)
        old = args.out / f"{args.stem}.json"
        earlier = earlier_rows(json.loads(old.read_text())) if args.append and old.exists() else None
        results["rows"] = with_conditions(rows, results["conditions"], earlier)
    finally:
        if server is not None:
            server.stop()
        if http is not None:
            http.terminate()
            http.wait()
            http.stdout.close()
        shutil.rmtree(work, ignore_errors=True)
    write_results(args.out, args.stem, results, render_markdown(results))


if __name__ == "__main__":
    main()
