"""Read ahead on a background thread: tensors for the next items load while the current one is computed.

The thread runs ``load(item)`` for the items in order and hands results over through a queue bounded by bytes
(each item's size is known before it is read, from the file headers), so read-ahead never holds more than
``max_bytes`` — or one item, when a single item is larger. Errors raised by ``load`` reach the consumer at the
item that failed. Closing (or leaving the ``with`` block) stops the thread after its current item.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class Prefetcher(Generic[Item, Result]):
    """Iterate ``(item, load(item))`` in order while a thread reads ahead within ``max_bytes``."""

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
        self._stop = False
        self.waited = 0.0  # seconds the consumer spent waiting for reads
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="driftmerge-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for item in self._items:
            size = self._size_of(item)
            with self._cond:
                while not self._stop and self._ahead > 0 and self._ahead + size > self._max:
                    self._cond.wait()
                if self._stop:
                    return
                self._ahead += size
            try:
                result, error = self._load(item), None
            except BaseException as exc:  # handed to the consumer, which raises it in its own thread
                result, error = None, exc
            with self._cond:
                self._ready.append((item, result, error, size))
                self._cond.notify_all()
            if error is not None:
                return

    def __iter__(self) -> Iterator[tuple[Item, Result]]:
        for _ in range(len(self._items)):
            with self._cond:
                t0 = time.perf_counter()
                while not self._ready:
                    self._cond.wait()
                self.waited += time.perf_counter() - t0
                item, result, error, size = self._ready.popleft()
                self._ahead -= size
                self._cond.notify_all()
            if error is not None:
                raise error
            yield item, result  # type: ignore[misc]

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._ready.clear()
            self._cond.notify_all()
        self._thread.join()

    def __enter__(self) -> Prefetcher[Item, Result]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
