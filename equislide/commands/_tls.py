"""TLS to an existing Dask scheduler: ``--tls-ca-file``, ``--tls-cert``, ``--tls-key``.

The options fill Dask's own configuration (``distributed.comm.tls.ca-file`` and the client's
``distributed.comm.tls.client.cert`` / ``.key``), so a ``distributed.Client`` made anywhere in the run
(the flow's task runner, ``tile``'s client) uses them, and a deployment that sets the same keys through
``DASK_DISTRIBUTED__COMM__TLS__CA_FILE`` etc. needs no options at all. Certificates: deploy/README.md.
"""

from __future__ import annotations

import argparse
import os

__all__ = ["add_tls_arguments", "apply_tls", "tls_problem"]

_OPTIONS = {
    "tls_ca_file": "distributed.comm.tls.ca-file",
    "tls_cert": "distributed.comm.tls.client.cert",
    "tls_key": "distributed.comm.tls.client.key",
}


def add_tls_arguments(p: argparse.ArgumentParser) -> None:
    """The three TLS options, for commands with ``--scheduler``."""
    p.add_argument(
        "--tls-ca-file",
        metavar="FILE",
        help="with --scheduler tls://...: the cluster's CA certificate (PEM); default: Dask config "
        "distributed.comm.tls.ca-file, e.g. $DASK_DISTRIBUTED__COMM__TLS__CA_FILE",
    )
    p.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="with --scheduler tls://...: this client's certificate (PEM, may hold the key too); "
        "default: distributed.comm.tls.client.cert",
    )
    p.add_argument(
        "--tls-key",
        metavar="FILE",
        help="with --scheduler tls://...: this client's private key (PEM); default: "
        "distributed.comm.tls.client.key",
    )


def _given(args: argparse.Namespace) -> dict[str, str]:
    return {name: getattr(args, name) for name in _OPTIONS if getattr(args, name, None)}


def tls_problem(args: argparse.Namespace) -> str | None:
    """The first problem with the TLS options against ``--scheduler``, in words; None when usable.

    A ``tls://`` scheduler needs a CA and a client certificate (from the options or Dask's config): the
    scheduler refuses a client without one, and saying so here beats Dask's ``TypeError`` about an
    ``ssl_context``.
    """
    import dask

    given = _given(args)
    scheduler = getattr(args, "scheduler", None) or ""
    if given and not scheduler.startswith("tls://"):
        names = ", ".join("--" + n.replace("_", "-") for n in given)
        return f"{names} need a --scheduler tls://HOST:PORT (got {scheduler or 'a local cluster'})"
    for name, path in given.items():
        flag = "--" + name.replace("_", "-")
        if not os.path.isfile(path):
            return f"{flag} {path}: no such file"
        if not os.access(path, os.R_OK):
            return f"{flag} {path}: not readable"
    if scheduler.startswith("tls://"):
        ca = given.get("tls_ca_file") or dask.config.get(_OPTIONS["tls_ca_file"], None)
        cert = given.get("tls_cert") or dask.config.get(_OPTIONS["tls_cert"], None)
        if not ca or not cert:
            return (
                f"--scheduler {scheduler} needs TLS certificates: --tls-ca-file and --tls-cert "
                "(and --tls-key), or Dask config distributed.comm.tls.* (see deploy/README.md)"
            )
    return None


def apply_tls(args: argparse.Namespace) -> None:
    """Put the given TLS options into Dask's configuration for the rest of the process."""
    import dask

    given = _given(args)
    if given:
        dask.config.set({_OPTIONS[name]: os.path.abspath(path) for name, path in given.items()})
