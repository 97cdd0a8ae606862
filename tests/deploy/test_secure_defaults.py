"""Secure by default: what equislide starts listens on loopback only, the documented secrets command
makes certificates Dask accepts, and no code path can unpickle a file."""

from __future__ import annotations

import copy
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


# --- servers equislide starts ------------------------------------------------------------------------

PROBE = textwrap.dedent(
    """
    import json, os, sys, psutil
    from equislide.flows.cluster import dask_client, shared_prefect_api, worker_environment

    def listening():
        me = psutil.Process()
        out = []
        for p in [me, *me.children(recursive=True)]:
            conns = p.net_connections("inet")
            out += [[p.pid, c.laddr.ip, c.laddr.port] for c in conns if c.status == "LISTEN"]
        return out

    if __name__ == "__main__":
        with shared_prefect_api() as api, dask_client(workers=2) as client:
            client.wait_for_workers(2, timeout=120)
            print(json.dumps({"api": api, "scheduler": client.scheduler.address, "listening": listening()}))
    """
)


@pytest.mark.slow
def test_local_cluster_and_temporary_prefect_server_listen_on_loopback_only(tmp_path: Path) -> None:
    """The local cluster ``segment`` and ``tile`` start (scheduler, nannies, workers, their HTTP
    endpoints) and the temporary Prefect server: every listening socket of the process tree is on
    127.0.0.1, none on 8787 (another run's dashboard port)."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_EPHEMERAL_ENABLED": "true"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["api"].startswith("http://127.0.0.1:"), info["api"]
    assert info["scheduler"].startswith("tcp://127.0.0.1:"), info["scheduler"]
    pids = {pid for pid, _, _ in info["listening"]}
    assert len(pids) >= 3, info["listening"]  # the client's process, two workers, the Prefect server
    assert {ip for _, ip, _ in info["listening"]} == {"127.0.0.1"}, info["listening"]
    assert 8787 not in {port for _, _, port in info["listening"]}, info["listening"]


def test_dashboard_is_moved_only_when_asked(monkeypatch) -> None:
    from equislide.flows.cluster import DASHBOARD_ENV, local_cluster_spec

    monkeypatch.delenv(DASHBOARD_ENV, raising=False)
    _, kwargs = local_cluster_spec(1)
    assert kwargs["host"] == "127.0.0.1" and kwargs["dashboard_address"] == "127.0.0.1:0"
    assert kwargs["scheduler_kwargs"] == {"dashboard": False}
    monkeypatch.setenv(DASHBOARD_ENV, "0.0.0.0:8787")
    _, kwargs = local_cluster_spec(1)
    assert kwargs["host"] == "127.0.0.1" and kwargs["dashboard_address"] == "0.0.0.0:8787"
    assert "scheduler_kwargs" not in kwargs


# --- the documented certificates ---------------------------------------------------------------------


@pytest.mark.skipif(
    shutil.which("openssl") is None, reason="deploy/make-secrets.sh needs the openssl command"
)
def test_make_secrets_makes_certificates_dask_accepts(tmp_path: Path) -> None:
    from cryptography import x509
    from distributed.security import Security

    folder, env_file = tmp_path / "secrets", tmp_path / ".env"
    run = subprocess.run(
        ["sh", str(REPO / "deploy" / "make-secrets.sh"), str(folder), str(env_file)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    ca = x509.load_pem_x509_certificate((folder / "dask-ca.pem").read_bytes())
    cert = x509.load_pem_x509_certificate((folder / "dask.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "dask-scheduler" in names.get_values_for_type(x509.DNSName)
    assert (folder / "dask.key").stat().st_mode & 0o077 == 0, "the private key is readable by others"
    env = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    assert re.fullmatch(r"equislide:[0-9a-f]{48}", env["PREFECT_API_AUTH_STRING"])
    assert re.fullmatch(r"[0-9a-f]{48}", env["POSTGRES_PASSWORD"])

    # A scheduler's and a client's TLS contexts from these files complete a mutual handshake.
    security = Security(
        tls_ca_file=str(folder / "dask-ca.pem"),
        tls_scheduler_cert=str(folder / "dask.pem"), tls_scheduler_key=str(folder / "dask.key"),
        tls_client_cert=str(folder / "dask.pem"), tls_client_key=str(folder / "dask.key"),
        require_encryption=True,
    )  # fmt: skip
    server_ctx = security.get_listen_args("scheduler")["ssl_context"]
    client_ctx = security.get_connection_args("client")["ssl_context"]
    a, b = socket.socketpair()
    seen: dict[str, object] = {}

    def serve() -> None:
        with server_ctx.wrap_socket(a, server_side=True) as s:
            seen["peer"] = s.getpeercert()
            s.sendall(b"ok")

    thread = threading.Thread(target=serve)
    thread.start()
    with client_ctx.wrap_socket(b) as c:
        assert c.recv(2) == b"ok"
    thread.join(10)
    assert seen["peer"], "the scheduler saw no client certificate"

    # A rerun never overwrites a cluster's certificates.
    again = subprocess.run(["sh", str(REPO / "deploy" / "make-secrets.sh"), str(folder), str(env_file)],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert again.returncode == 1 and "exists" in again.stderr


# --- weights ---------------------------------------------------------------------------------------

#: Calls that can run code from a file's bytes.
UNPICKLERS = re.compile(
    r"\btorch\.load\(|\bpickle\.loads?\(|\bUnpickler\(|\bjoblib\.load\(|\bdill\.loads?\(|allow_pickle\s*=\s*True"
)


def test_no_code_path_unpickles_a_file() -> None:
    """Only safetensors (and JSON) are read from disk: models/checkpoint.py refuses pickles by their
    bytes (tests/models/test_checkpoint.py), and no module anywhere calls an unpickler."""
    offenders = []
    for folder in ("equislide", "flows", "models", "stages", "storage", "tiling"):
        for path in (REPO / folder).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if UNPICKLERS.search(line.split("#", 1)[0]):
                    offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert offenders == []
    assert UNPICKLERS.search("state = torch.load(path)")  # the scan can fail


def test_tls_options_are_checked_before_any_work(tmp_path: Path) -> None:
    """``--tls-*`` without a tls:// scheduler, a missing file, a tls:// scheduler without certificates:
    one line each, exit 2, nothing written."""
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked here")
    cases = [
        (["--tls-ca-file", str(ca)], "need a --scheduler tls://"),
        (["--scheduler", "tls://127.0.0.1:1", "--tls-ca-file", str(tmp_path / "nope.pem")], "no such file"),
        (["--scheduler", "tls://127.0.0.1:1"], "needs TLS certificates"),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_DISTRIBUTED__COMM__TLS")}
    for extra, expected in cases:
        out = tmp_path / f"out{len(extra)}"
        proc = subprocess.run(
            [sys.executable, "-m", "equislide", "segment", str(ca), "--out", str(out), *extra],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], (extra, proc.stderr)
        assert not out.exists() or not any(out.iterdir()), extra


def test_tls_options_fill_dask_config(tmp_path: Path, monkeypatch) -> None:
    import argparse

    import dask
    from distributed.security import Security

    from equislide.commands._tls import apply_tls

    files = {}
    for name in ("ca", "cert", "key"):
        files[name] = tmp_path / f"{name}.pem"
        files[name].write_text("x")
    args = argparse.Namespace(
        tls_ca_file=str(files["ca"]), tls_cert=str(files["cert"]), tls_key=str(files["key"])
    )
    # apply_tls sets the process's config for good; dask.config.set mutates the very dict its default
    # argument bound at import, so the test restores that dict in place (swapping the attribute would
    # leave TLS on for every later test of the session).
    saved = copy.deepcopy(dask.config.config)
    try:
        assert Security().tls_ca_file is None
        apply_tls(args)
        security = Security()  # what a Client made anywhere in the process uses
        assert security.tls_ca_file == str(files["ca"])
        assert security.tls_client_cert == str(files["cert"]) and security.tls_client_key == str(files["key"])
    finally:
        dask.config.config.clear()
        dask.config.config.update(saved)
