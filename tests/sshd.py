"""A real OpenSSH server (Debian's openssh-server, installed by .ci/setup) on 127.0.0.1 for DVC remotes.

Everything it needs lives in one temporary folder: its config, host key, the
client key pair, authorized_keys, pid file and log, and a ``home`` whose
``.ssh/known_hosts`` trusts exactly this server's host key (point ``HOME``
there so DVC's SSH client verifies the host, as it would for a user).
"""

from __future__ import annotations

import getpass
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = Path("/usr/sbin/sshd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path) -> Path:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
        check=True,
        capture_output=True,
    )
    return path


@dataclass
class Sshd:
    folder: Path
    port: int
    user: str
    key: Path  # private key whose public half is authorized
    home: Path  # HOME with .ssh/known_hosts for this server
    proc: subprocess.Popen

    def url(self, path: Path) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_sshd(folder: Path) -> Sshd:
    assert SSHD.is_file(), f"{SSHD} is missing: run bash .ci/setup (it installs Debian's openssh-server)"
    folder.mkdir(parents=True, exist_ok=True)
    host_key = keygen(folder / "host_ed25519")
    client_key = keygen(folder / "client_ed25519")
    (folder / "authorized_keys").write_text(client_key.with_suffix(".pub").read_text())
    port = free_port()
    config = folder / "sshd_config"
    config.write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
PidFile {folder / "sshd.pid"}
AuthorizedKeysFile {folder / "authorized_keys"}
# CI runs as root; keys only, never passwords
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
# the temporary folder is world-readable: don't let sshd refuse the keys for it
StrictModes no
Subsystem sftp internal-sftp
""")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation folder sshd insists on
    with open(folder / "sshd.log", "wb") as log:  # sshd keeps its own descriptor
        proc = subprocess.Popen(
            [str(SSHD), "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT
        )
    home = folder / "home"
    (home / ".ssh").mkdir(parents=True)
    host_pub = host_key.with_suffix(".pub").read_text().split()
    (home / ".ssh/known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    server = Sshd(folder, port, getpass.getuser(), client_key, home, proc)
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"sshd exited with {proc.returncode}:\n{(folder / 'sshd.log').read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError as exc:
            if time.monotonic() > deadline:
                server.stop()
                raise AssertionError(
                    f"sshd did not listen on {port}:\n{(folder / 'sshd.log').read_text()}"
                ) from exc
            time.sleep(0.05)
