"""Read ahead on a background thread: tensors for the next items load while the current one is computed.

The thread runs ``load(item)`` for the items in order and hands results over through a queue bounded by bytes
(each item's size is known before it is read, from the file headers), so read-ahead never holds more than
``max_bytes`` — or one item, when a single item is larger. Any exception the thread meets (in ``size_of`` or
``load``, ``BaseException`` included) is raised in the consumer's thread at the item that failed, after the earlier
items. A thread that ends without handing over every item is detected (a flag set in its ``finally``, and a
liveness check every :attr:`Prefetcher.POLL_S` seconds of waiting) and raises ``RuntimeError`` in the consumer
instead of leaving it waiting. Closing (or leaving the ``with`` block) stops the thread after its current item and
joins it; one still open as Python exits (a Ctrl-C between starting it and entering its ``with``, a generator left
suspended) is closed then, since a daemon thread stopped inside torch code at finalization aborts the process
(pytorch#38228). All state the two threads share is guarded by one condition's lock.
"""

from __future__ import annotations

import atexit
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar, cast

Item = TypeVar("Item")
Result = TypeVar("Result")


_OPEN: weakref.WeakSet[Prefetcher] = weakref.WeakSet()  # started and not yet closed (a running thread holds its own)


@atexit.register  # atexit runs before Python stops daemon threads
def _close_open() -> None:
    for reader in list(_OPEN):
        reader.close()


class Prefetcher(Generic[Item, Result]):
    """Iterate ``(item, load(item))`` in order while a thread reads ahead within ``max_bytes``."""

    POLL_S = 1.0  # while waiting, how often the consumer checks that the thread is still alive

    def __init__(
        self,
        items: Sequence[Item],
        load: Callable[[Item], Result],
        size_of: Callable[[Item], int],
        max_bytes: int,
    ):
        self._items, self._load, self._size_of, self._max = list(items), load, size_of, max(int(max_bytes), 0)
        self._ready: deque[tuple[Item, Result | None, BaseException | None, int]] = deque()
        self._ahead = 0  # bytes loaded and not yet taken
        self._stop = False  # set by close(): the thread stops after its current item
        self._finished = False  # set by the thread as it ends, for any reason
        self.waited = 0.0  # seconds the consumer spent waiting for reads
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="driftmerge-prefetch", daemon=True)
        _OPEN.add(self)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._read_all()
        finally:  # whatever ended the thread, a waiting consumer wakes up and sees it
            with self._cond:
                self._finished = True
                self._cond.notify_all()

    def _read_all(self) -> None:
        for item in self._items:
            counted, result, error = 0, None, None  # counted: bytes this item added to _ahead
            try:
                size = max(int(self._size_of(item)), 0)
                with self._cond:
                    while not self._stop and self._ahead > 0 and self._ahead + size > self._max:
                        self._cond.wait()
                    if self._stop:
                        return
                    self._ahead += size
                    counted = size
                result = self._load(item)
            except BaseException as exc:  # handed to the consumer, which raises it in its own thread
                error = exc
            with self._cond:
                if self._stop:
                    return
                self._ready.append((item, result, error, counted))
                self._cond.notify_all()
            if error is not None:
                return

    def __iter__(self) -> Iterator[tuple[Item, Result]]:
        total = len(self._items)
        for k in range(total):
            with self._cond:
                t0 = time.perf_counter()
                while not self._ready:
                    if self._stop:
                        raise RuntimeError("the read-ahead was closed; it yields nothing more")
                    if self._finished or not self._thread.is_alive():  # its appends happened under this lock
                        raise RuntimeError(
                            f"internal error: the read-ahead thread stopped after handing over {k} of {total} items"
                        )
                    self._cond.wait(self.POLL_S)
                self.waited += time.perf_counter() - t0
                item, result, error, size = self._ready.popleft()
                self._ahead -= size
                self._cond.notify_all()
            if error is not None:
                raise error
            yield item, cast(Result, result)  # set whenever error is None

    def close(self) -> None:
        """Stop the thread (after the item it is loading) and wait for it to end."""
        with self._cond:
            self._stop = True
            self._ready.clear()
            self._cond.notify_all()
        if self._thread.is_alive():  # not when a Ctrl-C came before it started: it would stop at once anyway
            self._thread.join()
        _OPEN.discard(self)

    def __enter__(self) -> Prefetcher[Item, Result]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
