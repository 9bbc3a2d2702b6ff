"""Shared fixtures: a real HTTP(S) server on 127.0.0.1 whose routes simulate mirrors, and the tiny
shards and baseline training run the train-stage tests share.

Nothing here mocks urllib: the downloader talks to a real socket. Each route is
a small function that writes a response (or misbehaves: truncates, resets,
stalls, redirects). Generated tiny data lives in ``synth.py``.

``data`` and ``baseline`` are session-scoped (once per pytest-xdist worker):
every test that uses them only reads them, and writes its own runs under its
``tmp_path``.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

# The suite keeps every core busy (pytest-xdist workers, each starting training processes, DataLoader
# workers and ranks). OpenMP threads that spin at a barrier (GNU libgomp's default) then take the core
# from the very thread they wait for: two 60-step training loops of 2 threads each, side by side on the
# 2 cores, took 2.3-15.8 s with the default and 1.4-1.7 s with PASSIVE (they sleep instead). How the
# threads wait changes no result. Set before anything loads libgomp (it reads this once, at load); the
# tests' subprocesses inherit it. A value in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_TESTS = Path(__file__).resolve().parent
for _p in (_TESTS.parent, _TESTS):  # the repo's packages, and `import synth`, under plain `pytest` too
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

Route = Callable[[BaseHTTPRequestHandler], None]

# pytest-xdist (pyproject.toml's addopts) gives each worker whole files, in collection order. The
# longest files go first, so that none of them starts near the end while the other workers run out of
# work; the rest keep pytest's order. Seconds, serial, on the 2-core CI machine; a stale figure only
# costs balance, never a test.
LONGEST_FIRST = {
    "test_ddp.py": 180,
    "test_bench.py": 170,
    "test_any_shape_dvc.py": 95,
    "test_scale.py": 85,
    "test_resume.py": 65,
    "test_stream.py": 65,
    "test_team_remote.py": 55,
    "test_uint8.py": 50,
    "test_train_stage.py": 47,
    "test_kill.py": 45,
    "test_train_failures.py": 43,
    "test_parquet_stage.py": 34,
    "test_workers.py": 30,
    "test_parallel_stages.py": 30,
    "test_parallelprep_bench.py": 40,
    "test_cache_links.py": 27,
    "test_e2e_dvc.py": 23,
    "test_precision.py": 27,
    "test_tensorize.py": 23,
    "test_user_csv.py": 23,
    "test_train_stage_dvc.py": 21,
    "test_shuffle_window.py": 21,
    "test_augment.py": 21,
    "test_gpu_bench.py": 15,
    "test_plots_offline.py": 16,
    "test_trainer.py": 15,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: -LONGEST_FIRST.get(item.path.name, 0))  # stable: ties keep their order


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        self.server.hits.append(path)
        route = self.server.routes.get(path)
        if route is None:
            self.send_error(404, "Not Found")
            return
        route(self)

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes: dict[str, Route] = {}
        self.hits: list[str] = []
        self.release = threading.Event()  # set at teardown: stalling routes stop waiting

    def handle_error(self, request, client_address) -> None:  # resets we cause ourselves are expected
        pass


class LocalServer:
    """A running server plus helpers that register misbehaving routes."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self._srv = _Server()
        if tls is not None:
            self._srv.socket = tls.wrap_socket(self._srv.socket, server_side=True)
        self.scheme = "https" if tls is not None else "http"
        self.port = self._srv.server_address[1]
        self._thread = threading.Thread(
            target=self._srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    # -- addresses
    @property
    def base(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base + path

    @property
    def hits(self) -> list[str]:
        return self._srv.hits

    def route(self, path: str, fn: Route) -> None:
        self._srv.routes[path] = fn

    def close(self) -> None:
        self._srv.release.set()
        self._srv.shutdown()
        self._srv.server_close()

    # -- behaviours
    def serve(
        self,
        path: str,
        body: bytes,
        *,
        status: int = 200,
        content_length: bool = True,
        headers: dict[str, str] | None = None,
    ) -> None:
        """A normal response; without Content-Length the body ends when the connection closes."""

        def fn(h: BaseHTTPRequestHandler) -> None:
            h.send_response(status)
            h.send_header("Content-Type", "application/gzip")
            if content_length:
                h.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.send_header("Connection", "close")
            h.end_headers()
            h.wfile.write(body)
            h.close_connection = True

        self.route(path, fn)

    def serve_files(self, prefix: str, files: dict[str, bytes], **kw) -> str:
        for name, body in files.items():
            self.serve(f"{prefix}/{name}", body, **kw)
        return self.url(prefix)

    def status(self, path: str, code: int) -> None:
        self.route(path, lambda h: h.send_error(code))

    def truncated(self, path: str, body: bytes, claimed: int) -> None:
        """Announce ``claimed`` bytes, send ``body`` (shorter), close cleanly."""

        def fn(h: BaseHTTPRequestHandler) -> None:
            h.send_response(200)
            h.send_header("Content-Length", str(claimed))
            h.end_headers()
            h.wfile.write(body)
            h.close_connection = True

        self.route(path, fn)

    def reset(self, path: str, body: bytes, claimed: int) -> None:
        """Send part of the body, then abort the TCP connection (RST, not FIN)."""

        def fn(h: BaseHTTPRequestHandler) -> None:
            h.send_response(200)
            h.send_header("Content-Length", str(claimed))
            h.end_headers()
            h.wfile.write(body)
            sock = h.connection
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            h.close_connection = True

        self.route(path, fn)

    def stall(
        self, path: str, *, seconds: float = 10.0, after: bytes | None = None, claimed: int = 0
    ) -> None:
        """Send nothing (or headers and ``after`` bytes), then wait without closing."""
        release = self._srv.release

        def fn(h: BaseHTTPRequestHandler) -> None:
            if after is not None:
                h.send_response(200)
                h.send_header("Content-Length", str(claimed))
                h.end_headers()
                h.wfile.write(after)
            release.wait(seconds)
            h.close_connection = True

        self.route(path, fn)

    def paced(self, path: str, body: bytes, *, chunk: int, interval: float) -> None:
        """Send ``body`` ``chunk`` bytes at a time, ``interval`` seconds apart (a drip, or a slow link)."""
        release = self._srv.release

        def fn(h: BaseHTTPRequestHandler) -> None:
            h.send_response(200)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            for start in range(0, len(body), chunk):
                h.wfile.write(body[start : start + chunk])
                if release.wait(interval):
                    break
            h.close_connection = True

        self.route(path, fn)

    def dripped(self, path: str, head: bytes, trickle: bytes, interval: float) -> None:
        """Send the raw bytes ``head`` at once, then ``trickle`` one byte every ``interval`` seconds (in
        a status line, the headers or a chunk-size line: a read of one line never returns)."""
        release = self._srv.release

        def fn(h: BaseHTTPRequestHandler) -> None:
            h.wfile.write(head)
            for i in range(len(trickle)):
                h.wfile.write(trickle[i : i + 1])
                if release.wait(interval):
                    break
            h.close_connection = True

        self.route(path, fn)

    def redirect(self, path: str, location: str, code: int = 302) -> None:
        def fn(h: BaseHTTPRequestHandler) -> None:
            h.send_response(code)
            h.send_header("Location", location)
            h.send_header("Content-Length", "0")
            h.end_headers()
            h.close_connection = True

        self.route(path, fn)


@pytest.fixture
def http_server() -> Iterator[LocalServer]:
    server = LocalServer()
    yield server
    server.close()


@pytest.fixture
def http_server2() -> Iterator[LocalServer]:
    server = LocalServer()
    yield server
    server.close()


# ----------------------------------------------------------------------------- TLS


def _self_signed(folder: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def https_server(tls_cert: tuple[Path, Path]) -> Iterator[LocalServer]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*tls_cert)
    server = LocalServer(tls=ctx)
    yield server
    server.close()


@pytest.fixture
def client_tls(tls_cert: tuple[Path, Path]) -> ssl.SSLContext:
    """A client context that trusts exactly the test server's self-signed certificate."""
    return ssl.create_default_context(cafile=str(tls_cert[0]))


# ----------------------------------------------------------------------------- train-stage shards and run


@pytest.fixture(scope="session")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny shards: 256 train samples (4 batches of 64) and 128 test samples, 100 a shard."""
    from tests.test_trainer import make_split

    root = tmp_path_factory.mktemp("shards")
    make_split(root / "train", 256, split="train", shard_size=100, seed=1)
    make_split(root / "test", 128, split="test", shard_size=100, seed=2)
    return root


@pytest.fixture(scope="session")
def baseline(
    data: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, subprocess.CompletedProcess]:
    """One uninterrupted ``python -m stages.train`` run (2 epochs, num_workers 0) on ``data``: the result
    that resumed, killed, re-configured and failing-then-rerun runs must reproduce bit for bit."""
    from tests.test_train_stage import run_train, write_params

    work = tmp_path_factory.mktemp("baseline")
    res = run_train(data, work, write_params(work / "params.yaml", loader={"num_workers": 0}))
    assert res.returncode == 0, res.stderr
    return work, res
