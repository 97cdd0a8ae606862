"""The C ring-sum kernel of the SRE-Conv inference path (``ring_sums.c``), built on first use.

It is compiled with the system's C compiler into a per-user cache (``$XDG_CACHE_HOME/equislide``,
keyed by the source, the compiler flags and this CPU's model and flags, so nodes of different kinds
sharing a home directory each get their own build) and loaded with ctypes, which releases the GIL
while it runs. Its threads are an OpenMP team of the libgomp torch has loaded (``ring_sums.c``).
Without a compiler, or with ``EQUISLIDE_RING_KERNEL=0``, :func:`load` returns None and SREConv2d
takes its ring sums with torch's depthwise convolutions instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("ring_sums.c")
_FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fopenmp"]
_MAX_CHANNELS = 8192  # MAX_C in ring_sums.c
_P = ctypes.c_void_p
_I = ctypes.c_int64


def _cpu_key() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features", "CPU part"))][:3]
    return platform.machine() + "\n".join(keep)


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "equislide" / "kernels"


def _build(target: Path, flags: list[str] = _FLAGS) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise OSError("no C compiler (cc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed into place: processes starting together never load a
    # half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run(
            [cc, *flags, str(_SOURCE), "-o", tmp], check=True, capture_output=True, text=True, timeout=120
        )
        os.replace(tmp, target)
    except subprocess.CalledProcessError as err:
        detail = err.stderr.strip()[-300:]
        raise OSError(f"{cc} exited with {err.returncode}" + (f": {detail}" if detail else "")) from err
    except subprocess.TimeoutExpired as err:
        raise OSError(f"{cc} took over {err.timeout:.0f} s") from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The loaded kernel, or None (logged once) where it is switched off or cannot be built."""
    if os.environ.get("EQUISLIDE_RING_KERNEL", "1").lower() in ("0", "off", "false", "no"):
        return None
    try:
        source = _SOURCE.read_bytes()
        key = hashlib.sha256(source + " ".join(_FLAGS).encode() + _cpu_key().encode()).hexdigest()[:16]
        target = _cache_dir() / f"ring_sums-{key}.so"
        if not target.exists():
            _build(target)
        lib = ctypes.CDLL(str(target))
    except OSError as err:
        log.warning("SRE-Conv ring-sum kernel unavailable (%s); using torch's depthwise convolutions", err)
        return None
    return _bind(lib)


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    fn = lib.equislide_ring_sums
    fn.restype = ctypes.c_int
    fn.argtypes = [_P, _I, _I, _I, _P, _I, _I, _I, _I, _I, _P, _P, _P, _P, _I, ctypes.c_int, _I]
    return lib


def supports(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the kernel can take the ring sums of ``x`` computed in ``dtype``."""
    return (
        x.device.type == "cpu"
        and dtype in (torch.float32, torch.bfloat16)
        and x.shape[1] <= _MAX_CHANNELS
        and load() is not None
    )


def taps(basis: torch.Tensor, dilation: int) -> tuple[torch.Tensor, ...]:
    """``(dy, dx, weight, start)`` of the nonzero taps of ``basis`` ``(R, k, k)``, ring by ring."""
    dy, dx, wt, start = [], [], [], [0]
    for plane in basis.detach().to("cpu", torch.float32):
        nz = torch.nonzero(plane)
        dy += (nz[:, 0] * dilation).tolist()
        dx += (nz[:, 1] * dilation).tolist()
        wt += plane[nz[:, 0], nz[:, 1]].tolist()
        start.append(len(dy))
    i32 = torch.int32
    return (
        torch.tensor(dy, dtype=i32),
        torch.tensor(dx, dtype=i32),
        torch.tensor(wt, dtype=torch.float32),
        torch.tensor(start, dtype=i32),
    )


def ring_sums(
    image_hwc: torch.Tensor,
    out: torch.Tensor,
    y0: int,
    y1: int,
    w_out: int,
    stride: int,
    pad: int,
    tap_table: tuple[torch.Tensor, ...],
) -> None:
    """Ring sums of output rows ``[y0, y1)`` of a contiguous ``(H, W, C)`` image into ``out``,
    a contiguous ``((y1 - y0) * w_out, R * C)`` tensor of the image's dtype."""
    lib = load()
    assert lib is not None and image_hwc.is_contiguous() and out.is_contiguous()
    h, w, c = image_hwc.shape
    dy, dx, wt, start = tap_table
    rc = lib.equislide_ring_sums(
        image_hwc.data_ptr(), h, w, c, out.data_ptr(), y0, y1, w_out, stride, pad,
        dy.data_ptr(), dx.data_ptr(), wt.data_ptr(), start.data_ptr(), start.numel() - 1,
        int(image_hwc.dtype == torch.bfloat16), torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise ValueError(f"ring-sum kernel refused a ({h}, {w}, {c}) image")
