"""A prefetching reader: the next batch is read and decoded on a background thread while the current
one runs forward.

:class:`Prefetcher` calls ``load(item)`` for each item in order on one worker thread, at most ``depth``
items ahead of the consumer. Reading a zarr shard (file I/O, Blosc/zstd decode) releases the GIL, so it
overlaps a forward pass that also releases it. On a CUDA device the loaded uint8 array is also copied
into page-locked (pinned) host memory and sent to the device with a ``non_blocking`` copy on a side
stream, so the host-to-device transfer overlaps the forward pass as well; the consumer gets the device
tensor once its copy has finished.

An exception in ``load`` is re-raised in the consumer, as the very exception object ``load`` raised, at
the point where that item would have been yielded: the items before it are yielded (and their results
kept) first, and the caller sees the same error as without prefetching. The worker never blocks
forever: it stops when the consumer closes the prefetcher or stops iterating.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

__all__ = ["PREFETCH_ENV", "Prefetcher", "prefetch_enabled", "to_device_async"]

#: Environment variable switching the feature stage's prefetching reader off (``0``); on by default.
PREFETCH_ENV = "EQUISLIDE_PREFETCH"

T = TypeVar("T")
V = TypeVar("V")

_POLL_S = 0.1


def prefetch_enabled() -> bool:
    """The feature stage prefetches unless ``EQUISLIDE_PREFETCH`` is ``0``, ``false``, ``no`` or ``off``."""
    return os.environ.get(PREFETCH_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


class _Failed:
    """The worker's exception, carried to the consumer."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


_END = object()


def to_device_async(array: Any, device: Any, stream: Any = None) -> tuple[Any, Any]:
    """Start moving a host array to ``device``; returns ``(tensor, ready)``.

    On CUDA: the array is copied into pinned host memory and sent with a ``non_blocking`` copy on
    ``stream`` (a side stream); ``ready`` is the CUDA event recorded after the copy. Elsewhere: the
    array is returned as a CPU tensor (no copy for a numpy array) and ``ready`` is None.
    """
    import torch

    from equislide.arrays import to_torch

    t = to_torch(array)
    dev = torch.device(device)
    if dev.type != "cuda" or t.device.type == "cuda":
        return t, None
    pinned = t.pin_memory()  # torch's caching host allocator reuses these page-locked blocks
    with torch.cuda.stream(stream):
        on_device = pinned.to(dev, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(stream)
    return on_device, ready


def _wait_ready(tensor: Any, ready: Any) -> Any:
    """The consumer's side of :func:`to_device_async`: wait for the copy, then tell the caching
    allocator that the consumer's stream uses the tensor (it was allocated on the side stream)."""
    if ready is None:
        return tensor
    import torch

    ready.synchronize()
    tensor.record_stream(torch.cuda.current_stream(tensor.device))
    return tensor


class Prefetcher(Generic[T, V]):
    """Iterate ``(item, load(item))`` over ``items`` with the loads running ahead on a worker thread.

    Args:
        load: Reads one item (e.g. a range of tiles of a store) and returns its array.
        items: The items, in order.
        depth: Loaded items held ahead of the consumer (1: the next batch loads while this one runs).
        device: Where the consumer computes; on a CUDA device each loaded array is copied to it through
            pinned memory on a side stream (:func:`to_device_async`) and yielded as a device tensor.
            None or a CPU device: the array is yielded as ``load`` returned it.
        enabled: False loads each item in the consumer's thread when it is asked for (no thread): the
            same results and errors, for comparison and for ``EQUISLIDE_PREFETCH=0``.

    Use as a context manager (or call :meth:`close`) so that a consumer leaving early stops the worker.
    """

    def __init__(
        self,
        load: Callable[[T], V],
        items: Iterable[T],
        *,
        depth: int = 1,
        device: Any = None,
        enabled: bool = True,
    ) -> None:
        if depth < 1:
            raise ValueError(f"depth={depth} must be >= 1")
        self._load = load
        self._items = list(items)
        self._depth = int(depth)
        self._cuda = device is not None and _is_cuda(device)
        self._device = device
        self._enabled = enabled
        self._stop = threading.Event()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=self._depth)
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Prefetcher[T, V]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker (it finishes at most the load in progress) and wait for it."""
        self._stop.set()
        if self._thread is not None:  # a worker waiting to put sees the stop within _POLL_S
            self._thread.join()

    def _put(self, value: Any) -> bool:
        """Put unless the consumer has stopped; False when it has."""
        while not self._stop.is_set():
            try:
                self._queue.put(value, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        stream = None
        if self._cuda:
            import torch

            stream = torch.cuda.Stream(torch.device(self._device))
        try:
            for item in self._items:
                if self._stop.is_set():
                    return
                value: Any = self._load(item)
                if self._cuda:
                    value = to_device_async(value, self._device, stream)
                if not self._put((item, value)):
                    return
        except BaseException as err:  # every failure goes to the consumer, which re-raises it
            self._put(_Failed(err))
            return
        self._put(_END)

    def _deliver(self, value: Any) -> Any:
        return _wait_ready(*value) if self._cuda else value

    def __iter__(self) -> Iterator[tuple[T, V]]:
        if not self._enabled:
            for item in self._items:
                value: Any = self._load(item)
                if self._cuda:
                    value = _wait_ready(*to_device_async(value, self._device))
                yield item, value
            return
        if self._thread is not None:
            raise RuntimeError("a Prefetcher is iterated once")
        self._thread = threading.Thread(target=self._work, name="equislide-prefetch", daemon=True)
        self._thread.start()
        try:
            while True:
                try:
                    got = self._queue.get(timeout=_POLL_S)
                except queue.Empty:
                    if not self._thread.is_alive() and self._queue.empty():
                        # Cannot happen (the worker always puts an end or a failure); never hang on it.
                        raise RuntimeError("the prefetch thread ended without a result") from None
                    continue
                if got is _END:
                    return
                if isinstance(got, _Failed):
                    raise got.error
                item, value = got
                yield item, self._deliver(value)
        finally:
            self.close()


def _is_cuda(device: Any) -> bool:
    import torch

    return torch.device(device).type == "cuda"
