"""The downloader against real HTTP(S) servers on 127.0.0.1 serving generated IDX files.

Every hostile behaviour must be rejected (next source, or one error naming
every source and reason), never accepted, and a failed download leaves no
output folder behind.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
import socket
import subprocess
import sys
import time
import tracemalloc
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import synth

from pipeline.download import (
    GZIP_BLOCK,
    SOURCE_RECORD,
    FetchError,
    RateGuard,
    build_opener,
    fetch_dataset,
    fetch_file,
    gunzip_bounded,
    max_compressed_size,
    verify,
    verify_raw,
    write_skipped,
)
from pipeline.errors import DownloadError
from pipeline.sources import DatasetSpec, IdxFile

IMAGES = "train-images-idx3-ubyte.gz"
LABELS = "train-labels-idx1-ubyte.gz"


@pytest.fixture(scope="module")
def ds() -> synth.SynthDataset:
    return synth.dataset(n_train=120, n_test=40, seed=3)


def fetch(ds: synth.SynthDataset, out: Path, *sources: str, timeout: float = 5.0, opener=None, **kw) -> dict:
    return fetch_dataset(ds.spec, out, mirrors=sources, timeout=timeout, progress=False, opener=opener, **kw)


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert synth.leftovers(out.parent) == [], "a temporary was left beside the output"


def download_error(ds, tmp_path, *sources, **kw) -> str:
    out = tmp_path / "data" / "raw"
    with pytest.raises(DownloadError) as err:
        fetch(ds, out, *sources, **kw)
    assert_nothing_written(out)
    return str(err.value)


def failure_lines(message: str) -> dict[str, str]:
    """``{source: reason}`` from a DownloadError message."""
    lines = message.splitlines()
    out = {}
    for line in lines[1:]:
        assert line.startswith("  "), message
        source, _, reason = line.strip().partition(": ")
        out[source] = reason
    return out


# ============================================================================ success


def test_success_over_http(ds, http_server, tmp_path):
    base = http_server.serve_files("/mirror", {n: ds.gz(n) for n in ds.names})
    out = tmp_path / "data" / "raw"
    record = fetch(ds, out, base)
    assert sorted(p.name for p in out.iterdir()) == sorted([*ds.names, SOURCE_RECORD])
    for name in ds.names:
        assert (out / name).read_bytes() == ds.gz(name)  # stored exactly as received
        assert gzip.decompress((out / name).read_bytes()) == ds.raw[name]
        assert record["files"][name] == {
            "source": base,
            "sha256_decompressed": hashlib.sha256(ds.raw[name]).hexdigest(),
        }
    assert json.loads((out / SOURCE_RECORD).read_text()) == record
    assert record["dataset"] == "synth"
    assert sorted(http_server.hits) == sorted(f"/mirror/{n}" for n in ds.names)
    assert synth.leftovers(out.parent) == ["raw", *sorted(f"raw/{p}" for p in [*ds.names, SOURCE_RECORD])]


def test_success_replaces_a_previous_download_completely(ds, http_server, tmp_path):
    out = tmp_path / "raw"
    out.mkdir()
    (out / "stale.gz").write_bytes(b"old")
    fetch(ds, out, http_server.serve_files("/m", {n: ds.gz(n) for n in ds.names}))
    assert not (out / "stale.gz").exists()
    assert len(list(out.iterdir())) == 5


def test_local_folder_source(ds, tmp_path):
    folder = ds.write_folder(tmp_path / "usr-share-datasets")
    record = fetch(ds, tmp_path / "raw", str(folder))
    assert {v["source"] for v in record["files"].values()} == {str(folder)}


def test_a_folder_may_hold_the_files_gunzipped(ds, tmp_path):
    """An unpacked download (gunzip) holds train-images-idx3-ubyte, not the .gz:
    the checksums are of the decompressed bytes, so it verifies, and is gzipped into data/raw."""
    folder = tmp_path / "kaggle"
    folder.mkdir()
    for name, raw in ds.raw.items():
        (folder / name[:-3]).write_bytes(raw)
    record = fetch(ds, tmp_path / "raw", str(folder))
    for name, raw in ds.raw.items():
        assert gzip.decompress((tmp_path / "raw" / name).read_bytes()) == raw
        assert record["files"][name] == {
            "source": str(folder),
            "sha256_decompressed": hashlib.sha256(raw).hexdigest(),
            "gzipped_here_from": name[:-3],
        }
    verify_raw(ds.spec, tmp_path / "raw")  # what the csv stage checks
    first = (tmp_path / "raw" / IMAGES).read_bytes()
    fetch(ds, tmp_path / "raw", str(folder))
    assert (tmp_path / "raw" / IMAGES).read_bytes() == first  # gzipped the same way every time


def test_a_torchvision_dataset_folder_is_pointed_to_its_raw_folder(ds, tmp_path):
    """torchvision's FashionMNIST(root, download=True) keeps the files in <root>/FashionMNIST/raw/."""
    ds.write_folder(tmp_path / "FashionMNIST" / "raw")
    msg = download_error(ds, tmp_path / "x", str(tmp_path / "FashionMNIST"))
    assert failure_lines(msg)[str(tmp_path / "FashionMNIST")] == (
        f"{tmp_path / 'FashionMNIST' / IMAGES} not found, nor {IMAGES[:-3]} (uncompressed); torchvision "
        f"keeps them in raw/: use {tmp_path / 'FashionMNIST' / 'raw'}"
    )
    fetch(ds, tmp_path / "raw", str(tmp_path / "FashionMNIST" / "raw"))


def test_a_folder_source_that_names_a_file_or_lacks_one_says_so(ds, tmp_path):
    folder = ds.write_folder(tmp_path / "downloads")
    given = folder / IMAGES  # one of the files, where its folder belongs
    msg = download_error(ds, tmp_path / "x", str(given))
    assert failure_lines(msg)[str(given)] == (
        f"{given} is a file; expected the folder that holds {IMAGES}: {folder}"
    )
    (folder / IMAGES).unlink()
    msg = download_error(ds, tmp_path / "x", str(folder))
    assert failure_lines(msg)[str(folder)] == (
        f"{folder / IMAGES} not found, nor {IMAGES[:-3]} (uncompressed)"
    )


def test_a_gz_beside_its_gunzipped_twin_is_taken_as_it_is(ds, tmp_path):
    folder = ds.write_folder(tmp_path / "both", level=1)
    (folder / IMAGES[:-3]).write_bytes(ds.raw[IMAGES])
    record = fetch(ds, tmp_path / "raw", str(folder))
    assert (tmp_path / "raw" / IMAGES).read_bytes() == ds.gz(IMAGES, level=1)
    assert "gzipped_here_from" not in record["files"][IMAGES]


@pytest.mark.parametrize(
    "content, reason",
    [
        (lambda raw: raw[:-1] + b"x", "SHA-256 of decompressed content is "),
        (lambda raw: raw + b"x", "{path} is {n} bytes, more than the largest valid file ({size} bytes)"),
    ],
)
def test_a_gunzipped_file_that_does_not_verify_moves_on_to_the_next_source(ds, tmp_path, content, reason):
    bad = tmp_path / "bad"
    bad.mkdir()
    raw = ds.raw[IMAGES]
    (bad / IMAGES[:-3]).write_bytes(content(raw))
    good = ds.write_folder(tmp_path / "good")
    record = fetch(ds, tmp_path / "raw", str(bad), str(good))
    assert record["files"][IMAGES]["source"] == str(good)
    msg = download_error(ds, tmp_path / "x", str(bad))
    expected = reason.format(path=bad / IMAGES[:-3], n=len(raw) + 1, size=len(raw))
    assert failure_lines(msg)[str(bad)].startswith(expected)


def test_a_folder_source_under_the_home_folder_may_start_with_a_tilde(ds, tmp_path, monkeypatch):
    """``data.mirrors: [~/datasets/mnist]`` reads the folder a shell would; the record keeps the words."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    ds.write_folder(tmp_path / "home" / "datasets" / "mnist")
    record = fetch(ds, tmp_path / "raw", "~/datasets/mnist")
    assert {v["source"] for v in record["files"].values()} == {"~/datasets/mnist"}


@pytest.mark.parametrize("level", [0, 1, 6])
def test_recompressed_file_still_verifies(ds, http_server, tmp_path, level):
    """A mirror that re-compressed the archives (different bytes) verifies by decompressed SHA-256."""
    files = {n: ds.gz(n, level=level) for n in ds.names}
    assert files[IMAGES] != ds.gz(IMAGES, level=9)
    out = tmp_path / "raw"
    fetch(ds, out, http_server.serve_files("/m", files))
    assert (out / IMAGES).read_bytes() == files[IMAGES]


def test_multi_member_gzip_verifies(ds, tmp_path):
    raw = ds.raw[LABELS]
    blob = synth.gz(raw[:50]) + synth.gz(raw[50:])  # what `cat a.gz b.gz` produces
    assert gunzip_bounded(blob, len(raw)) == raw
    verify(ds.spec.train.labels, blob)


def test_members_across_the_blocks_fed_to_zlib_decompress_whole():
    """Members are fed to zlib a block at a time (GZIP_BLOCK): boundaries fall anywhere in a block."""
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, 5 * GZIP_BLOCK, dtype=np.uint8).tobytes()  # incompressible: blocks of input
    cuts = [0, 1, 2, GZIP_BLOCK - 7, GZIP_BLOCK + 3, 3 * GZIP_BLOCK, len(raw)]
    blob = b"".join(synth.gz(raw[a:b]) for a, b in itertools.pairwise(cuts)) + synth.gz(b"")
    assert gunzip_bounded(blob, len(raw)) == raw
    with pytest.raises(FetchError, match="truncated gzip stream"):
        gunzip_bounded(blob[: len(blob) // 2], len(raw))


def test_fallback_to_the_next_source(ds, http_server, http_server2, tmp_path):
    bad = http_server.url("/gone")  # every file 404s here
    good = http_server2.serve_files("/m", {n: ds.gz(n) for n in ds.names})
    record = fetch(ds, tmp_path / "raw", bad, good)
    assert {v["source"] for v in record["files"].values()} == {good}
    assert sorted(http_server.hits) == sorted(f"/gone/{n}" for n in ds.names)  # each file tried there first


def test_fallback_is_per_file(ds, http_server, tmp_path):
    """Only the file that fails on the first source comes from the second one."""
    files = {n: ds.gz(n) for n in ds.names}
    first = http_server.serve_files("/a", {**files, LABELS: synth.gz(ds.raw[LABELS][:-1] + b"\x09")})
    second = http_server.serve_files("/b", files)
    record = fetch(ds, tmp_path / "raw", first, second)
    sources = {n: v["source"] for n, v in record["files"].items()}
    assert sources == {n: (second if n == LABELS else first) for n in ds.names}


def test_https_with_a_trusted_certificate(ds, https_server, client_tls, tmp_path):
    base = https_server.serve_files("/m", {n: ds.gz(n) for n in ds.names})
    opener = build_opener(urllib.request.HTTPSHandler(context=client_tls))
    record = fetch(ds, tmp_path / "raw", base, opener=opener)
    assert base.startswith("https://")
    assert {v["source"] for v in record["files"].values()} == {base}


def test_https_to_https_redirect_is_followed(ds, https_server, client_tls, tmp_path):
    for n in ds.names:
        https_server.redirect(f"/old/{n}", https_server.url(f"/new/{n}"))
        https_server.serve(f"/new/{n}", ds.gz(n))
    opener = build_opener(urllib.request.HTTPSHandler(context=client_tls))
    fetch(ds, tmp_path / "raw", https_server.url("/old"), opener=opener)
    assert f"/new/{IMAGES}" in https_server.hits


# ============================================================================ failures


def test_404_everywhere(ds, http_server, tmp_path):
    msg = download_error(ds, tmp_path, http_server.url("/nothing"))
    assert msg.splitlines()[0] == f"could not get {IMAGES} from any source:"
    assert failure_lines(msg) == {http_server.url("/nothing"): "HTTP 404 Not Found"}


@pytest.mark.parametrize("code", [500, 403, 503])
def test_http_error_status(ds, http_server, tmp_path, code):
    for n in ds.names:
        http_server.status(f"/m/{n}", code)
    reason = failure_lines(download_error(ds, tmp_path, http_server.url("/m")))[http_server.url("/m")]
    assert reason.startswith(f"HTTP {code} ")


def test_wrong_checksum(ds, http_server, tmp_path):
    other = synth.dataset(n_train=120, n_test=40, seed=99)  # same shapes, other pixels
    base = http_server.serve_files("/m", {n: other.gz(n) for n in ds.names})
    reason = failure_lines(download_error(ds, tmp_path, base))[base]
    got = hashlib.sha256(other.raw[IMAGES]).hexdigest()
    assert reason == f"SHA-256 of decompressed content is {got}, expected {ds.spec.train.images.sha256}"


def test_truncated_body(ds, http_server, tmp_path):
    body = ds.gz(IMAGES)
    for n in ds.names:
        http_server.truncated(f"/m/{n}", body[:1000], claimed=len(body))
    reason = failure_lines(download_error(ds, tmp_path, http_server.url("/m")))[http_server.url("/m")]
    assert "truncated body" in reason and "1000" in reason and str(len(body)) in reason


def test_body_shorter_than_a_lying_content_length_header(ds, http_server, tmp_path):
    """Content-Length smaller than the real file: the client stops there, the gzip is incomplete."""
    body = ds.gz(IMAGES)
    http_server.serve(f"/m/{IMAGES}", body, headers={})  # correct one, to prove the route works...
    http_server.truncated(f"/m/{IMAGES}", body, claimed=len(body) // 2)  # ...then the lying one
    reason = failure_lines(download_error(ds, tmp_path, http_server.url("/m")))[http_server.url("/m")]
    assert reason in ("truncated gzip stream",) or reason.startswith("corrupt gzip stream")


def test_connection_reset_mid_body(ds, http_server, tmp_path):
    body = ds.gz(IMAGES)
    http_server.reset(f"/m/{IMAGES}", body[: len(body) // 2], claimed=len(body))
    reason = failure_lines(download_error(ds, tmp_path, http_server.url("/m")))[http_server.url("/m")]
    assert "ConnectionResetError" in reason or "truncated body" in reason, reason


def test_connection_refused(ds, tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    base = f"http://127.0.0.1:{port}/m"
    reason = failure_lines(download_error(ds, tmp_path, base))[base]
    assert reason.startswith("cannot connect:") and "refused" in reason.lower()


def test_server_that_stalls_before_answering(ds, http_server, tmp_path):
    http_server.stall(f"/m/{IMAGES}")
    start = time.monotonic()
    reason = failure_lines(download_error(ds, tmp_path, http_server.url("/m"), timeout=0.5))[
        http_server.url("/m")
    ]
    assert time.monotonic() - start < 4
    assert "timed out" in reason


def test_server_that_stalls_mid_body_then_next_source(ds, http_server, tmp_path):
    body = ds.gz(IMAGES)
    http_server.stall(f"/m/{IMAGES}", after=body[:500], claimed=len(body))
    folder = ds.write_folder(tmp_path / "local")
    start = time.monotonic()
    record = fetch(ds, tmp_path / "raw", http_server.url("/m"), str(folder), timeout=0.5)
    assert time.monotonic() - start < 4
    assert record["files"][IMAGES]["source"] == str(folder)


def test_server_that_drips_bytes_is_cut_off_by_the_minimum_rate(ds, http_server, tmp_path):
    """8 bytes every 0.05 s (1.3 kbit/s) never lets one read wait for the socket timeout: the rate check stops
    it."""
    body = ds.gz(IMAGES)
    http_server.paced(f"/m/{IMAGES}", body, chunk=8, interval=0.05)
    start = time.monotonic()
    message = download_error(ds, tmp_path, http_server.url("/m"), timeout=0.5, min_rate_kbps=64)
    elapsed = time.monotonic() - start
    reason = failure_lines(message)[http_server.url("/m")]
    assert (
        reason.startswith("transfer too slow: ")
        and "in the last 0.5 s, below the minimum of 64 kbit/s" in reason
    )
    assert "data.min_rate_kbps" in reason
    assert elapsed < 3, elapsed  # one window (0.5 s) and a read, not the 5+ s the whole drip would take


@pytest.mark.parametrize("where", ["headers", "chunk-size line"])
def test_a_drip_inside_one_read_is_cut_off_by_the_minimum_rate(ds, http_server, tmp_path, where):
    """The status line and headers, and a chunked body's size lines, are each read to their end inside
    one read: a byte every 0.2 s never returned from it, so only the checks made on a timer stop it."""
    body = ds.gz(IMAGES)
    if where == "headers":
        head, drip = b"", b"HTTP/1.1 200 OK\r\nContent-Type: application/gzip\r\n" + b"X-Pad: " + b"a" * 200
    else:
        chunk = body[:1000]
        head = (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n" % len(chunk)
            + chunk
            + b"\r\n"
        )
        drip = b"0" * 200  # the next chunk's size line, one digit at a time
    http_server.dripped(f"/m/{IMAGES}", head, drip, 0.2)
    folder = ds.write_folder(tmp_path / "local")
    record = fetch(ds, tmp_path / "raw", http_server.url("/m"), str(folder), timeout=0.5, min_rate_kbps=64)
    assert record["files"][IMAGES]["source"] == str(folder)
    message = download_error(ds, tmp_path / "again", http_server.url("/m"), timeout=0.5, min_rate_kbps=64)
    reason = failure_lines(message)[http_server.url("/m")]
    assert reason.startswith("transfer too slow: ") and "data.min_rate_kbps" in reason, reason


def test_slow_link_above_the_minimum_rate_succeeds(tmp_path, http_server):
    """About 160 kbit/s against a floor of 32: the transfer spans many rate windows and per-read timeouts."""
    small = synth.dataset(n_train=24, n_test=8, seed=5)
    body = small.gz(IMAGES)
    http_server.paced(f"/m/{IMAGES}", body, chunk=1000, interval=0.05)
    for name in small.names:
        if name != IMAGES:
            http_server.serve(f"/m/{name}", small.gz(name))
    start = time.monotonic()
    record = fetch(small, tmp_path / "raw", http_server.url("/m"), timeout=0.2, min_rate_kbps=32)
    elapsed = time.monotonic() - start
    assert record["files"][IMAGES]["source"] == http_server.url("/m")
    assert (tmp_path / "raw" / IMAGES).read_bytes() == body
    assert elapsed > 4 * 0.2, f"{len(body)} bytes in {elapsed:.2f} s: too fast to prove anything"


def test_rate_guard_uses_a_sliding_window():
    now = [0.0]
    guard = RateGuard(window_s=1.0, min_rate_kbps=8, clock=lambda: now[0])  # 1000 bytes per window
    for t in (0.1, 0.5, 0.9):  # nothing is judged before one full window
        now[0] = t
        guard.update(10)
    now[0] = 1.0
    guard.update(970)  # 1000 bytes in (0, 1]
    now[0] = 1.6
    guard.update(600)  # 1570 in (0.6, 1.6]: 970 + 600
    now[0] = 2.05
    with pytest.raises(FetchError, match=r"transfer too slow: 600 bytes in the last 1 s"):
        guard.update(0)  # (1.05, 2.05] holds only the 600: a burst long ago no longer counts
    off = RateGuard(window_s=1.0, min_rate_kbps=0, clock=lambda: now[0])
    now[0] = 100.0
    off.update(1)  # 0 disables the rate check


def test_all_sources_failing_lists_every_source_and_reason(ds, http_server, tmp_path):
    other = synth.dataset(n_train=120, n_test=40, seed=7)
    http_server.status(f"/e500/{IMAGES}", 500)
    http_server.serve(f"/sum/{IMAGES}", other.gz(IMAGES))
    missing = tmp_path / "no-such-folder"
    sources = [
        http_server.url("/e404"),
        http_server.url("/e500"),
        http_server.url("/sum"),
        str(missing),
        "ftp://example.invalid/mnist",
    ]
    msg = download_error(ds, tmp_path, *sources)
    reasons = failure_lines(msg)
    assert list(reasons) == sources  # every source, in the order tried
    assert reasons[sources[0]] == "HTTP 404 Not Found"
    assert reasons[sources[1]].startswith("HTTP 500")
    assert reasons[sources[2]].startswith("SHA-256 of decompressed content is ")
    assert reasons[sources[3]] == f"{missing}: no such folder"
    assert reasons[sources[4]].startswith("unsupported source scheme 'ftp'")


def test_no_sources_at_all(ds, tmp_path):
    msg = download_error(ds, tmp_path)
    assert msg == f"could not get {IMAGES} from any source:\n"


def test_failure_keeps_the_previous_complete_download(ds, http_server, tmp_path):
    out = tmp_path / "raw"
    fetch(ds, out, ds_folder := str(ds.write_folder(tmp_path / "local")))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(DownloadError):
        fetch(ds, out, http_server.url("/nothing"))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert ds_folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local", "raw"]


def test_failure_on_the_last_file_writes_nothing(ds, http_server, tmp_path):
    files = {n: ds.gz(n) for n in ds.names}
    last = ds.names[-1]
    base = http_server.serve_files("/m", {n: b for n, b in files.items() if n != last})
    msg = download_error(ds, tmp_path, base)
    assert msg.splitlines()[0] == f"could not get {last} from any source:"


# ============================================================================ hostile servers


def test_redirect_from_https_to_plain_http_refused(ds, https_server, http_server, client_tls, tmp_path):
    good = http_server.serve_files("/plain", {n: ds.gz(n) for n in ds.names})  # would verify if fetched
    for n in ds.names:
        https_server.redirect(f"/m/{n}", f"{good}/{n}")
    opener = build_opener(urllib.request.HTTPSHandler(context=client_tls))
    base = https_server.url("/m")
    reason = failure_lines(download_error(ds, tmp_path, base, opener=opener))[base]
    assert reason == f"refused redirect from {base}/{IMAGES} to {good}/{IMAGES}"
    assert http_server.hits == []  # the plain-HTTP copy was never even requested


def test_redirect_to_plain_http_moves_on_to_the_next_source(
    ds, https_server, http_server, client_tls, tmp_path
):
    good = http_server.serve_files("/plain", {n: ds.gz(n) for n in ds.names})
    for n in ds.names:
        https_server.redirect(f"/m/{n}", f"{good}/{n}", code=301)
    folder = ds.write_folder(tmp_path / "local")
    opener = build_opener(urllib.request.HTTPSHandler(context=client_tls))
    record = fetch(ds, tmp_path / "raw", https_server.url("/m"), str(folder), opener=opener)
    assert {v["source"] for v in record["files"].values()} == {str(folder)}


def test_untrusted_certificate_refused(ds, https_server, tmp_path):
    """The default opener verifies certificates: a self-signed (MITM) server is refused."""
    base = https_server.serve_files("/m", {n: ds.gz(n) for n in ds.names})
    reason = failure_lines(download_error(ds, tmp_path, base))[base]
    assert "CERTIFICATE_VERIFY_FAILED" in reason


@pytest.mark.parametrize("target", ["file", "data", "ftp"])
def test_redirect_to_another_scheme_refused(ds, http_server, tmp_path, target):
    folder = ds.write_folder(tmp_path / "secret")
    import base64

    location = {
        "file": (folder / IMAGES).as_uri(),
        "data": "data:application/gzip;base64," + base64.b64encode(ds.gz(LABELS)).decode(),
        "ftp": "ftp://127.0.0.1/" + IMAGES,
    }[target]
    http_server.redirect(f"/m/{IMAGES}", location)
    base = http_server.url("/m")
    reason = failure_lines(download_error(ds, tmp_path, base))[base]
    # file: and data: are refused by urllib's own scheme check before any handler sees them; ftp:, which
    # urllib would follow, only by ours (_NoDowngradeRedirect)
    if target == "ftp":
        assert reason == f"refused redirect from {base}/{IMAGES} to {location}", reason
    else:
        assert reason == f"HTTP 302 Found - Redirection to url '{location}' is not allowed", reason


def test_a_malformed_redirect_or_mirror_url_moves_on_to_the_next_source(ds, http_server, tmp_path):
    """urllib raises ValueError on such URLs: it used to end the stage with a traceback."""
    http_server.redirect(f"/m/{IMAGES}", "http://[::1")
    bad, broken = http_server.url("/m"), "http://[::1/mirror"
    good = ds.write_folder(tmp_path / "good")
    record = fetch(ds, tmp_path / "raw", broken, bad, str(good))
    assert record["files"][IMAGES]["source"] == str(good)
    msg = download_error(ds, tmp_path, broken, bad)
    assert failure_lines(msg)[broken] == "malformed URL: Invalid IPv6 URL"
    assert failure_lines(msg)[bad] == "malformed URL: Invalid IPv6 URL"


def test_redirect_loop_refused(ds, http_server, tmp_path):
    http_server.redirect(f"/m/{IMAGES}", http_server.url(f"/m/{IMAGES}"))
    msg = download_error(ds, tmp_path, http_server.url("/m"))
    reason = failure_lines(msg)[http_server.url("/m")]  # also checks the reason stays on one line
    assert reason.startswith("HTTP 302 ") and "infinite loop" in reason


def oversized(ds) -> bytes:
    """A valid .gz of the expected file padded past the largest size such a file can compress to."""
    limit = max_compressed_size(ds.spec.train.images)
    return ds.gz(IMAGES) + bytes(limit)


def test_body_larger_than_expected_with_content_length(ds, http_server, tmp_path):
    body = oversized(ds)
    http_server.serve(f"/m/{IMAGES}", body)
    reason = failure_lines(download_error(ds, tmp_path, http_server.url("/m")))[http_server.url("/m")]
    limit = max_compressed_size(ds.spec.train.images)
    assert reason == f"Content-Length {len(body)} exceeds the largest valid file ({limit} bytes)"


def test_body_larger_than_expected_without_content_length(ds, http_server, tmp_path):
    http_server.serve(f"/m/{IMAGES}", oversized(ds), content_length=False)
    reason = failure_lines(download_error(ds, tmp_path, http_server.url("/m")))[http_server.url("/m")]
    limit = max_compressed_size(ds.spec.train.images)
    assert reason == f"body exceeds the largest valid file ({limit} bytes)"


def test_valid_file_without_content_length_is_accepted(ds, http_server, tmp_path):
    """The control for the test above: a body ended by closing the connection is fine if it verifies."""
    fetch(
        ds,
        tmp_path / "raw",
        http_server.serve_files("/m", {n: ds.gz(n) for n in ds.names}, content_length=False),
    )


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda raw: synth.gz(raw) + bytes(100), "trailing garbage after gzip stream"),
        (lambda raw: synth.gz(raw) + synth.gz(b"more"), "decompresses to more than the expected"),
        (lambda raw: synth.gz(raw)[:-9], "truncated gzip stream"),
        (lambda raw: raw, "not a gzip file (bad magic)"),
        (lambda raw: b"", "not a gzip file (bad magic)"),
        (lambda raw: b"<html>mirror moved</html>", "not a gzip file (bad magic)"),
        (lambda raw: synth.gz(raw[:-1]), "SHA-256 of decompressed content is"),
        (lambda raw: synth.gz(raw + b"\x00"), "decompresses to more than the expected"),
    ],
    ids=[
        "trailing-garbage",
        "extra-member",
        "cut-gzip",
        "not-gzipped",
        "empty",
        "html",
        "one-byte-short",
        "one-byte-long",
    ],
)
def test_bodies_that_do_not_verify(ds, http_server, tmp_path, make, expected):
    http_server.serve(f"/m/{LABELS}", make(ds.raw[LABELS]))
    for n in ds.names:
        if n != LABELS:
            http_server.serve(f"/m/{n}", ds.gz(n))
    msg = download_error(ds, tmp_path, http_server.url("/m"))
    assert msg.splitlines()[0] == f"could not get {LABELS} from any source:"
    assert failure_lines(msg)[http_server.url("/m")].startswith(expected)


def test_corrupt_deflate_data(ds, http_server, tmp_path):
    blob = bytearray(ds.gz(IMAGES))
    blob[len(blob) // 2] ^= 0xFF
    http_server.serve(f"/m/{IMAGES}", bytes(blob))
    reason = failure_lines(download_error(ds, tmp_path, http_server.url("/m")))[http_server.url("/m")]
    assert reason.startswith("corrupt gzip stream")


def test_gzip_bomb_over_http(ds, http_server, tmp_path):
    bomb = synth.gzip_bomb(64 << 20)  # 64 MiB of zeros in ~64 KB: smaller than the largest valid .gz
    assert len(bomb) < max_compressed_size(ds.spec.train.images)
    http_server.serve(f"/m/{IMAGES}", bomb)
    reason = failure_lines(download_error(ds, tmp_path, http_server.url("/m")))[http_server.url("/m")]
    assert reason == f"decompresses to more than the expected {ds.spec.train.images.size} bytes"


def test_gzip_bomb_is_decompressed_in_bounded_memory():
    bomb = synth.gzip_bomb(256 << 20)  # 256 MiB of zeros
    tracemalloc.start()
    try:
        with pytest.raises(FetchError, match="decompresses to more than the expected 100000 bytes"):
            gunzip_bounded(bomb, 100_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"peak {peak} bytes while refusing a gzip bomb"


def test_many_small_gzip_members_cannot_exceed_the_size():
    member = synth.gz(b"x" * 1000)
    with pytest.raises(FetchError, match="more than the expected 5000 bytes"):
        gunzip_bounded(member * 100, 5000)


def test_idx_header_must_match_the_expected_shape(ds, tmp_path):
    """Even a file whose checksum matches is refused if the spec's shape disagrees with its header."""
    real = ds.spec.train.labels
    lying = IdxFile(real.name, real.sha256, real.size, (real.shape[0] + 1,))
    with pytest.raises(FetchError, match=r"IDX shape \[120\], expected \[121\]"):
        verify(lying, ds.gz(LABELS))


def test_spec_whose_counts_disagree_is_refused(ds, tmp_path):
    t = ds.spec.train
    bad_labels = IdxFile(t.labels.name, t.labels.sha256, t.labels.size, (7,))
    spec = DatasetSpec("bad", type(t)(t.images, bad_labels), ds.spec.test, ())
    with pytest.raises(DownloadError, match=f"{IMAGES} has 120 images but {LABELS} has 7 labels"):
        fetch_dataset(spec, tmp_path / "raw", progress=False)
    assert not (tmp_path / "raw").exists()


# ============================================================================ hostile local folders


def test_folder_file_larger_than_expected(ds, tmp_path):
    folder = ds.write_folder(tmp_path / "local")
    limit = max_compressed_size(ds.spec.train.images)
    (folder / IMAGES).write_bytes(oversized(ds))
    reason = failure_lines(download_error(ds, tmp_path, str(folder)))[str(folder)]
    assert reason == (
        f"{folder / IMAGES} is {len(oversized(ds))} bytes, more than the largest valid file ({limit} bytes)"
    )


def test_folder_entry_that_is_a_directory(ds, tmp_path):
    folder = ds.write_folder(tmp_path / "local")
    (folder / IMAGES).unlink()
    (folder / IMAGES).mkdir()
    reason = failure_lines(download_error(ds, tmp_path, str(folder)))[str(folder)]
    assert str(folder / IMAGES) in reason


def test_file_url_is_not_a_source(ds, tmp_path):
    folder = ds.write_folder(tmp_path / "local")
    reason = failure_lines(download_error(ds, tmp_path, folder.as_uri()))[folder.as_uri()]
    assert reason.startswith("unsupported source scheme 'file'")


_SPECIAL = """
import os, sys
sys.path[:0] = [{repo!r}, {tests!r}]
import synth
from pipeline.download import fetch_file
ds = synth.dataset(120, 40, seed=3)
folder = {folder!r}
try:
    fetch_file(ds.spec.train.images, (folder,), progress=False)
except Exception as exc:
    print(type(exc).__name__ + ": " + str(exc))
"""


@pytest.mark.parametrize("kind", ["dev-zero", "fifo"])
def test_folder_entry_that_is_not_a_regular_file(ds, tmp_path, kind):
    """A symlink to /dev/zero must not be read forever, nor a FIFO block the stage."""
    folder = tmp_path / "local"
    folder.mkdir()
    if kind == "dev-zero":
        os.symlink("/dev/zero", folder / IMAGES)
    else:
        os.mkfifo(folder / IMAGES)
    code = _SPECIAL.format(repo=str(synth.REPO), tests=str(Path(__file__).parent), folder=str(folder))

    def limit_memory():  # a regression would otherwise eat the machine's memory
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, preexec_fn=limit_memory
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"DownloadError: could not get {IMAGES} from any source:")
    assert f"{folder / IMAGES} is not a regular file" in proc.stdout


# ============================================================================ fetch_file directly


def test_fetch_file_returns_the_first_verified_source(ds, http_server, tmp_path):
    folder = ds.write_folder(tmp_path / "local", level=1)
    got = fetch_file(ds.spec.train.images, (http_server.url("/none"), str(folder)), progress=False)
    assert got.source == str(folder)
    assert got.data == ds.gz(IMAGES, level=1)


def test_progress_bar_does_not_break_a_transfer(ds, http_server, tmp_path):
    base = http_server.serve_files("/m", {n: ds.gz(n) for n in ds.names})
    got = fetch_file(ds.spec.train.images, (base,), progress=True, timeout=5)
    assert got.data == ds.gz(IMAGES)


# ============================================================================ the stage, as a process

SITECUSTOMIZE = """
# Test only: swap the built-in mnist spec for a generated one, so `python -m stages.download`
# runs unchanged against a local server with tiny files (and never reaches the internet).
import json
from pipeline.sources import DATASETS, DatasetSpec, IdxFile, SplitFiles
_doc = json.loads({spec!r})
_f = lambda d: IdxFile(d["name"], d["sha256"], d["size"], tuple(d["shape"]))
DATASETS["mnist"] = DatasetSpec(_doc["name"], SplitFiles(*map(_f, _doc["train"])),
                                SplitFiles(*map(_f, _doc["test"])), tuple(_doc["sources"]))
"""


def stage(tmp_path: Path, ds, *args: str, mirrors: list[str], dataset: str = "mnist"):
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE.format(spec=synth.spec_to_json(ds.spec)))
    params = synth.write_params(tmp_path / "params.yaml", data={"dataset": dataset, "mirrors": mirrors})
    return synth.run_stage("download", "--params", params, *args, cwd=tmp_path, extra_path=[site])


def test_stage_downloads_from_a_mirror(ds, http_server, tmp_path):
    base = http_server.serve_files("/m", {n: ds.gz(n) for n in ds.names})
    proc = stage(tmp_path, ds, "--out", "data/raw", mirrors=[base])
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "data" / "raw"
    assert sorted(p.name for p in out.iterdir()) == sorted([*ds.names, SOURCE_RECORD])
    assert f"download: {IMAGES} verified, from {base}" in proc.stdout


def test_stage_reports_every_failure_and_exits_2(ds, http_server, tmp_path):
    http_server.status(f"/b/{IMAGES}", 500)
    sources = [http_server.url("/a"), http_server.url("/b")]
    proc = stage(tmp_path, ds, "--out", "data/raw", mirrors=sources)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"error: could not get {IMAGES} from any source:\n")
    assert f"  {sources[0]}: HTTP 404 Not Found" in proc.stderr
    assert f"  {sources[1]}: HTTP 500" in proc.stderr
    assert synth.leftovers(tmp_path / "data") == []


def test_stage_timeout_option(ds, http_server, tmp_path):
    http_server.stall(f"/m/{IMAGES}")
    start = time.monotonic()
    proc = stage(tmp_path, ds, "--out", "data/raw", "--timeout", "0.5", mirrors=[http_server.url("/m")])
    assert time.monotonic() - start < 15
    assert proc.returncode == 2 and "timed out" in proc.stderr and "Traceback" not in proc.stderr
    assert synth.leftovers(tmp_path / "data") == []


def test_stage_takes_its_limits_from_params(ds, http_server, tmp_path):
    http_server.paced(f"/m/{IMAGES}", ds.gz(IMAGES), chunk=8, interval=0.05)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE.format(spec=synth.spec_to_json(ds.spec)))
    params = synth.write_params(
        tmp_path / "params.yaml",
        data={"dataset": "mnist", "mirrors": [http_server.url("/m")], "timeout_s": 0.3, "min_rate_kbps": 100},
    )
    proc = synth.run_stage(
        "download", "--params", params, "--out", "data/raw", cwd=tmp_path, extra_path=[site]
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        "transfer too slow: " in proc.stderr
        and "in the last 0.3 s, below the minimum of 100 kbit/s" in proc.stderr
    )
    assert synth.leftovers(tmp_path / "data") == []


def test_stage_skips_download_for_csv(ds, http_server, tmp_path):
    proc = stage(tmp_path, ds, "--out", "data/raw", mirrors=[http_server.url("/m")], dataset="csv")
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "data" / "raw" / SOURCE_RECORD).read_text())
    assert record == {"dataset": "csv", "files": {}, "skipped": "data.dataset is csv"}
    assert http_server.hits == []


def test_write_skipped_is_atomic_and_replaces(tmp_path):
    out = tmp_path / "raw"
    out.mkdir()
    (out / "train-images-idx3-ubyte.gz").write_bytes(b"old")
    write_skipped(out, "csv")
    assert [p.name for p in out.iterdir()] == [SOURCE_RECORD]


def test_stage_help():
    proc = synth.run_stage("download", "--help", cwd=synth.REPO)
    assert proc.returncode == 0 and "--out" in proc.stdout and "--timeout" in proc.stdout


def test_stage_refuses_bad_mirrors_param(ds, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  mirrors: http://a.example\n")
    proc = synth.run_stage("download", "--params", params, "--out", tmp_path / "raw", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        f"error: {params}: data.mirrors: expected a list of strings, found 'http://a.example'" in proc.stderr
    )
    assert not (tmp_path / "raw").exists()
