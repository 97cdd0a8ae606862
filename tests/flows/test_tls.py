"""TLS between the Dask scheduler, its workers and ``equislide segment``; no way in without a certificate.

All real: a TLS-only ``dask scheduler`` and a ``dask worker`` (with the preload deploy/README.md
documents) as separate processes on loopback, certificates made here with ``cryptography`` (a
dependency of ``distributed``'s TLS), a phantom TMA segmented through ``--scheduler tls://``.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

SEGMENT = ["--mpp", "5", "--tile", "128", "--halo", "16", "--layer", "3", "--width", "8"]
ENV = {
    **os.environ,
    "PYTHONUNBUFFERED": "1",
    "MALLOC_MMAP_THRESHOLD_": "33554432",  # the documented worker environment (deploy/README.md)
    # A refused client is told within seconds, not after Dask's 30 s of connection retries.
    "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "10s",
}


def _make_pair(folder: Path, name: str, ca: tuple | None = None) -> tuple[Path, Path, tuple]:
    """A certificate and key under ``folder``, signed by ``ca`` (``(cert, key)``), else self-signed CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca[0].subject if ca else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if ca is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        ).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
    cert = builder.sign(ca[1] if ca else key, hashes.SHA256())
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path, (cert, key)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("certs")
    ca_pem, _, ca = _make_pair(folder, "ca")
    cert, key, _ = _make_pair(folder, "dask", ca)
    # An impostor: a well-formed certificate from a CA the cluster does not trust.
    other_ca_pem, _, other_ca = _make_pair(folder, "other-ca")
    other_cert, other_key, _ = _make_pair(folder, "impostor", other_ca)
    return {"ca": ca_pem, "cert": cert, "key": key, "other_cert": other_cert, "other_key": other_key}


def _tls(certs: dict[str, Path]) -> list[str]:
    return [
        "--tls-ca-file",
        str(certs["ca"]),
        "--tls-cert",
        str(certs["cert"]),
        "--tls-key",
        str(certs["key"]),
    ]


def _listening(pid: int) -> list[tuple[str, int]]:
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    found = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            found += [s.laddr for s in p.net_connections(kind="inet") if s.status == psutil.CONN_LISTEN]
    return [(a.ip, a.port) for a in found]


@pytest.fixture(scope="module")
def tls_cluster(certs, tmp_path_factory):
    """A TLS-only scheduler and one worker process (with its nanny) on 127.0.0.1; killed after."""
    folder = tmp_path_factory.mktemp("cluster")
    file = folder / "scheduler.json"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "start_new_session": True}
    sched = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--protocol", "tls", "--host", "127.0.0.1",
         "--port", "0", "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(file), *_tls(certs)],
        env=ENV, **quiet,
    )  # fmt: skip
    procs = [sched]
    try:
        deadline = time.monotonic() + 90
        while not file.exists() or not file.read_text().strip():
            assert sched.poll() is None, "the TLS scheduler exited at start"
            assert time.monotonic() < deadline, "the TLS scheduler did not start in 90 s"
            time.sleep(0.1)
        time.sleep(0.3)
        address = json.loads(file.read_text())["address"]
        worker = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
             "--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0",
             "--preload", "equislide.flows._preload", *_tls(certs)],
            env=ENV, **quiet,
        )  # fmt: skip
        procs.append(worker)
        from distributed import Client
        from distributed.security import Security

        security = Security(
            tls_ca_file=str(certs["ca"]), tls_client_cert=str(certs["cert"]),
            tls_client_key=str(certs["key"]), require_encryption=True,
        )  # fmt: skip
        with Client(address, security=security, timeout=60) as client:
            client.wait_for_workers(1, timeout=180)
        yield {"address": address, "scheduler": sched, "worker": worker}
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    from equislide.tiling import write_phantom

    folder = tmp_path_factory.mktemp("phantom")
    return write_phantom(folder / "tma.tiff", cores=6, core_diameter_um=800.0, seed=3).image_path


def _segment(
    phantom: Path, out: Path, address: str, *extra: str, timeout: float
) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "equislide", "segment", str(phantom), "--out", str(out), *SEGMENT]
    return subprocess.run(
        [*command, "--scheduler", address, *extra], env=ENV, capture_output=True, text=True, timeout=timeout
    )


def test_cluster_listens_on_loopback_and_speaks_only_tls(tls_cluster, certs):
    """Every socket of the scheduler and the worker (nanny included) is on 127.0.0.1; the scheduler's
    port refuses plain TCP and a TLS handshake without a client certificate."""
    for role in ("scheduler", "worker"):
        addresses = _listening(tls_cluster[role].pid)
        assert addresses, f"the {role} listens nowhere?"
        assert {ip for ip, _ in addresses} == {"127.0.0.1"}, f"{role} listens on {addresses}"
    host, port = tls_cluster["address"].removeprefix("tls://").rsplit(":", 1)

    from distributed import Client

    start = time.monotonic()
    with pytest.raises(OSError):
        Client(f"tcp://{host}:{port}", timeout=5)
    assert time.monotonic() - start < 30, "a plain-TCP client hung"

    # Trusts the cluster's CA but shows no certificate of its own: the scheduler ends the handshake.
    context = ssl.create_default_context(cafile=str(certs["ca"]))
    context.check_hostname = False
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        pytest.raises((ssl.SSLError, ConnectionError)),
        context.wrap_socket(raw) as tls,
    ):
        tls.sendall(b"\0" * 8)
        # TLS 1.3 finishes the client's side first; the server's refusal arrives as an alert on read.
        assert tls.recv(1) != b"", "the scheduler kept a connection that showed no client certificate"
        pytest.fail("the scheduler talked to a client without a certificate")


def test_segment_through_tls_and_clients_without_the_certificate_refused(
    tls_cluster, certs, phantom, tmp_path
):
    address = tls_cluster["address"]

    # No certificate at all: refused before any work, one line, exit 2.
    start = time.monotonic()
    bare = _segment(phantom, tmp_path / "bare", address, timeout=120)
    assert bare.returncode == 2, bare.stderr[-2000:]
    lines = bare.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs TLS certificates" in lines[0], bare.stderr
    assert time.monotonic() - start < 60

    # A certificate from another CA: the scheduler refuses it; one line, exit 1, no hang.
    start = time.monotonic()
    impostor = _segment(
        phantom, tmp_path / "impostor", address,
        "--tls-ca-file", str(certs["ca"]), "--tls-cert", str(certs["other_cert"]),
        "--tls-key", str(certs["other_key"]), timeout=240,
    )  # fmt: skip
    assert impostor.returncode == 1, impostor.stderr[-3000:]
    assert "Traceback" not in impostor.stderr, impostor.stderr[-3000:]
    errors = [line for line in impostor.stderr.splitlines() if line.startswith("equislide segment: error:")]
    assert len(errors) == 1 and "do not trust each other's TLS certificates" in errors[0], impostor.stderr
    took = time.monotonic() - start
    assert took < 60, f"the refusal took {took:.0f} s"
    print(f"impostor refused in {took:.1f} s: {errors[0]}")
    assert not (tmp_path / "impostor").exists() or not any((tmp_path / "impostor").iterdir())

    # The cluster's certificate: the cohort runs on the TLS cluster's worker.
    out = tmp_path / "run"
    done = _segment(phantom, out, address, *_tls(certs), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "run.json").read_text())
    assert report["device"]["scheduler"] == address, report["device"]
    assert [i["status"] for i in report["inputs"]] != ["failed"], report["inputs"]
    assert len(report["samples"]) >= 3, report["samples"]  # the phantom's cores, each a sample
    assert all(sid.startswith("tma/") for sid in report["samples"]), report["samples"]
    assert all(s["status"] == "done" for s in report["samples"].values()), report["samples"]
