"""Helpers shared by the subcommands: the progress bar and checks of common options."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

__all__ = [
    "MAX_CLUSTERS",
    "add_input_arguments",
    "add_width_argument",
    "WEIGHTS_HELP",
    "add_mpp_arguments",
    "check_inputs",
    "check_clusters",
    "check_mpp_arguments",
    "check_out_dir",
    "check_seed",
    "check_weights",
    "check_weights_option",
    "progress_bar",
    "usage_error",
]

#: Default of ``--max-tiles`` (:data:`equislide.tiling.MAX_TILES`, not imported: the CLI starts fast).
_MAX_TILES = 100_000


def usage_error(prefix: str, message: str) -> int:
    """Print ``<prefix>: error: <message>`` on stderr; returns exit status 2."""
    print(f"{prefix}: error: {message}", file=sys.stderr)
    return 2


def check_out_dir(out: Path | str) -> str | None:
    """Create the output folder and prove it writable; the problem in words, or None when it is usable.

    Writability is tried, not inferred from mode bits (root ignores them; a read-only mount does not
    show in them): a run must not tile every input before finding it cannot write its report.
    """
    import errno
    import tempfile

    if str(out).strip() == "":
        return "--out is empty: give the run folder (use --out . for the current folder)"
    out = Path(out)
    if out.exists() and not out.is_dir():
        return f"--out {out} exists and is not a folder"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        why = "a part of the path is a file" if err.errno in (errno.ENOTDIR, errno.EEXIST) else err.strerror
        return f"--out {out}: cannot create the folder ({why})"
    try:
        fd, probe = tempfile.mkstemp(prefix=".equislide-write-test-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        return f"--out {out}: the folder is not writable ({err.strerror})"
    from equislide.storage.confine import OutsideOutputError, check_output_tree

    try:
        check_output_tree(out)
    except OutsideOutputError as err:
        return f"--out {out}: {err}"
    return None


#: ``--settle-seconds`` default (:data:`equislide.stages.inputs.SETTLE_SECONDS`, not imported: the CLI
#: starts fast).
_SETTLE_SECONDS = 2.0


def add_input_arguments(p) -> None:
    """``SLIDE...`` (files, globs, folders), ``--manifest FILE.csv`` and ``--settle-seconds``."""
    p.add_argument(
        "slides",
        nargs="*",
        metavar="SLIDE",
        help="slide or image files, globs (quoted, '**' recursive: '/data/inbox/**/*.svs') or folders "
        "(every slide or image file under it)",
    )
    p.add_argument(
        "--manifest",
        default=None,
        metavar="FILE.csv",
        help="CSV of inputs with a header: path (relative to the CSV), optional mpp (fills in missing "
        "metadata, as --input-mpp, per input) and sample_id; a bad row fails alone, naming the file and line",
    )
    p.add_argument(
        "--settle-seconds",
        type=float,
        default=_SETTLE_SECONDS,
        metavar="S",
        help="files found by a glob, folder or manifest that were modified in the last S seconds or change "
        "over S seconds are left for the next run, as are .part/.partial/.tmp/.crdownload names "
        f"(default {_SETTLE_SECONDS:g}; 0: no check). Files named directly are always taken",
    )


def check_inputs(args) -> str | None:
    """The inputs' problem in words: none given, a bad settle time, or a manifest that cannot be read
    (bad rows of a readable one fail alone, later); None when usable."""
    slides, manifest = getattr(args, "slides", []), getattr(args, "manifest", None)
    if not slides and manifest is None:
        return "give SLIDE files, globs or folders, or --manifest FILE.csv"
    settle = getattr(args, "settle_seconds", 0.0)
    if not 0 <= settle <= 3600:
        return f"--settle-seconds {settle:g} must be between 0 and 3600"
    if manifest is not None:
        from equislide.stages.inputs import InputsError, read_manifest

        try:
            read_manifest(manifest)
        except InputsError as err:
            return f"--manifest: {err}"
        if getattr(args, "force_mpp", None) is not None and any(r.mpp for r in read_manifest(manifest)[0]):
            return "--force-mpp and a manifest mpp column exclude each other (the manifest's mpp fills in)"
    return None


def check_seed(seed: int) -> str | None:
    """``--seed`` must be a valid numpy/torch seed."""
    if not 0 <= seed < 2**32:
        return f"--seed {seed} must be between 0 and {2**32 - 1}"
    return None


#: Most K-means clusters: every cluster keeps its own colour (the shared palette has 256 entries, 0 =
#: no tissue) in the overlay, the OME-Zarr label colours and the QuPath classes, and labels fit uint8.
MAX_CLUSTERS = 255


def check_clusters(k: int) -> str | None:
    if not 2 <= k <= MAX_CLUSTERS:
        return f"--clusters {k} must be between 2 and {MAX_CLUSTERS} (one colour per cluster)"
    return None


def check_weights(path: str, backbone: str | None = None, option: str = "--weights") -> str | None:
    """A checkpoint's header and config, read without loading its tensors; the problem or None.

    ``backbone`` (registered name), when given, must be the checkpoint's architecture.
    """
    from equislide.models._errors import CheckpointError
    from equislide.models.checkpoint import read_checkpoint_document

    try:
        document = read_checkpoint_document(path)
    except CheckpointError as err:
        return f"{option} {path}: {_without_path(str(err), path)}"
    except OSError as err:
        return f"{option} {path}: cannot read it ({err.strerror})"
    arch = document.get("model", {}).get("arch")
    if backbone is not None and arch != backbone:
        return f"{option} {path}: holds a {arch!r} network, not {backbone!r}; pick the matching --backbone"
    return None


#: ``--weights`` help shared by ``segment`` and ``demo``.
WEIGHTS_HELP = (
    "backbone checkpoint (.safetensors); 'random' = a seeded random initialisation with BatchNorm "
    "recalibrated on the cohort's tiles; default: the backbone's packaged default weights where the "
    "package makes some the default (README, Weights; none is today), else 'random'"
)


def check_weights_option(value: str | None, backbone: str, option: str = "--weights") -> str | None:
    """``--weights`` as given: None = the packaged default (its registry and file must be intact),
    ``random``, or a checkpoint of ``backbone``; the problem in words, or None."""
    from equislide.models._errors import DefaultWeightsError
    from equislide.models.defaults import packaged_weights
    from equislide.specs import RANDOM_WEIGHTS

    if value == RANDOM_WEIGHTS:
        return None
    if value is not None:
        return check_weights(value, backbone, option=option)
    try:
        packaged_weights(backbone)
    except DefaultWeightsError as err:
        return f"packaged default weights of {backbone}: {err} (give --weights FILE or --weights random)"
    return None


def _without_path(message: str, path: str) -> str:
    """A checkpoint error without its leading path (the option already names the file)."""
    for prefix in (f"{path}: ", f"{Path(path)}: "):
        if message.startswith(prefix):
            return message[len(prefix) :]
    return message


def progress_bar():
    """A rich progress display on stderr (description, bar, done/total, elapsed)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
    )


def add_width_argument(p) -> None:
    """``--width`` of the commands that segment (``segment``, ``consistency``): random weights only."""
    p.add_argument(
        "--width",
        type=int,
        default=None,
        help="stage-1 channels of random weights (default 64); a width the packaged default weights "
        "do not have means random weights",
    )


def add_precision_argument(p) -> None:
    """``--precision`` of the commands that extract features (``segment``, ``consistency``)."""
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        default="auto",
        help="forward precision of the features (torch.autocast): auto (default) = bf16 where the "
        "device computes it in hardware (CUDA with bf16; a CPU with AVX-512 BF16 or AMX), else fp32; "
        "fp16 only on GPUs. The resolved one is in run.json and keys the features: a rerun at another "
        "precision recomputes them",
    )


def check_precision(precision: str, scheduler: str | None) -> str | None:
    """fp16 on a local cluster without CUDA, in words (a remote cluster's workers are asked there)."""
    if precision != "fp16" or scheduler:
        return None
    import torch

    if torch.cuda.is_available():
        return None
    return (
        "--precision fp16 needs a GPU: on a CPU it is emulated (slower than fp32) and float16's range "
        "risks overflow inside the network; use --precision bf16 or fp32"
    )


def add_mpp_arguments(p, *, cohort: bool = False) -> None:
    """``--input-mpp``, ``--force-mpp``, ``--native-pixels`` and ``--max-tiles`` (``tile``,
    ``segment``); with ``cohort``, ``--fit-native`` too. The rules: README, "Inputs and resolution"."""
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--input-mpp",
        type=float,
        default=None,
        metavar="X",
        help="µm per level-0 pixel for inputs whose metadata has no usable resolution; usable "
        "metadata wins (a warning says when X contradicts it)",
    )
    group.add_argument(
        "--force-mpp",
        type=float,
        default=None,
        metavar="X",
        help="µm per level-0 pixel of every input, replacing its metadata (warned where they disagree)",
    )
    p.add_argument(
        "--native-pixels",
        action="store_true",
        help="process inputs without a usable resolution at native level-0 pixels instead of refusing "
        "them (the analysis --mpp is not applied to them"
        + ("; a cohort K-means fit leaves them out unless --fit-native)" if cohort else ")"),
    )
    if cohort:
        p.add_argument(
            "--fit-native",
            action="store_true",
            help="with --native-pixels and --fit cohort: pool native-pixel samples into the cohort "
            "K-means fit too (default: they are labelled by the model of the others)",
        )
    p.add_argument(
        "--max-tiles",
        type=int,
        default=_MAX_TILES,
        metavar="N",
        help=f"refuse a slide planned to more than N tiles (default {_MAX_TILES})",
    )


def check_mpp_arguments(args) -> str | None:
    """The first problem with the options of :func:`add_mpp_arguments`, in words; None when usable."""
    from equislide.tiling._mpp import check_user_mpp

    for flag, value in (("--input-mpp", args.input_mpp), ("--force-mpp", args.force_mpp)):
        if value is not None:
            problem = check_user_mpp(value, flag)
            if problem:
                return problem
    if args.max_tiles < 1:
        return f"--max-tiles {args.max_tiles} must be >= 1"
    if getattr(args, "fit_native", False) and not args.native_pixels:
        return "--fit-native needs --native-pixels (without it no sample is at native pixels)"
    return None


def fault_line(err: BaseException, *, scheduler: str | None = None) -> str:
    """What an infrastructure fault was, in one line an operator acts on (disk, cluster, or other);
    ``scheduler``: the existing Dask scheduler the run used, named when the cluster is lost."""
    import errno

    from equislide.text import one_line

    chain, seen = [], err
    while seen is not None and len(chain) < 8:  # the root cause may hide under Prefect's wrappers
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for e in chain:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            where = f" writing {e.filename}" if e.filename else ""
            return f"disk full{where} ({e.strerror}); free space and rerun: finished work is kept"
    for e in chain:
        name = type(e).__name__
        text = one_line(e)
        if name in _CLUSTER_ERRORS or (isinstance(e, OSError) and "Timed out trying to connect" in text):
            # Which cluster: an operator with several schedulers restarts the one named here.
            which = f" (scheduler {scheduler})" if scheduler else ""
            # Dask's texts run to several sentences ("... Please check your connection ..."): whole ones.
            short = (text if len(text) <= 160 else text[:160].rsplit(". ", 1)[0]).rstrip(". ")
            return f"the Dask cluster was lost{which}: {name}: {short}; rerun when it is back (work is kept)"
    return f"unexpected {type(err).__name__}: {one_line(err)[:300]}"


#: Exceptions of ``distributed`` that mean the scheduler or the connection to it is gone.
_CLUSTER_ERRORS = {"CommClosedError", "FutureCancelledError", "StreamClosedError", "CancelledError"}


@contextlib.contextmanager
def one_line_logs():
    """Console log handlers print one line per record for the block: a fault inside Prefect or Dask is
    logged by each of them with its traceback (four for one lost scheduler, measured), which buries the
    CLI's own one-line error."""
    from equislide.text import one_line_console

    changed = one_line_console()
    try:
        yield
    finally:
        for h, formatter in changed:
            h.setFormatter(formatter)


def record_fault(
    out: str | Path,
    command: list[str],
    reason: str,
    started: float,
    inputs: list[str] | None = None,
    report: str = "run.json",
) -> bool:
    """Put ``reason`` into ``OUT/<report>`` (this run's, or a new one naming the command and inputs); True
    when written. A disk that is full may refuse even that: the caller still prints the line."""
    import traceback

    from equislide.files import atomic_write_json, read_json
    from equislide.storage import RunManifest, read_manifest, write_manifest

    path = Path(out) / report
    detail = traceback.format_exc(limit=20)
    try:
        mine = path.is_file() and path.stat().st_mtime >= started  # written by this run before the fault
        if report == "run.json":
            manifest = read_manifest(path) if mine else RunManifest(command=list(command))
            if not mine:
                manifest.inputs = [{"path": str(p)} for p in inputs or []]
            manifest.error, manifest.error_detail = reason, detail
            write_manifest(path, manifest)
        else:
            doc = (read_json(path) if mine else None) or {
                "command": list(command),
                "inputs": [{"path": str(p)} for p in inputs or []],
            }
            atomic_write_json(path, {**doc, "error": reason, "error_detail": detail})
    except Exception:  # noqa: BLE001 - nothing more to save; the printed line is what is left
        return False
    return True


def locked_run(
    prefix: str,
    out: str,
    command: list[str],
    work,
    *,
    inputs: list[str] | None = None,
    report: str = "run.json",
    scheduler: str | None = None,
):
    """``work()`` holding ``out``'s lock: ``(0, result)``; ``(2, None)`` when another run holds the folder;
    ``(1, None)`` after an infrastructure fault, printed as one line (naming ``scheduler``, the existing
    Dask scheduler, when it was lost) and recorded in ``run.json``."""
    import time

    from equislide.storage import OutputLocked, output_lock

    started = time.time()
    try:
        with output_lock(out, command), one_line_logs():
            return 0, work()
    except OutputLocked as err:
        return usage_error(prefix, str(err)), None
    except Exception as err:  # noqa: BLE001 - an infrastructure fault: one line, not a traceback
        line = fault_line(err, scheduler=scheduler)
        saved = record_fault(out, command, line, started, inputs, report)
        note = "" if saved else f" ({report} could not be written)"
        print(f"{prefix}: error: {line}{note}", file=sys.stderr)
        return 1, None
