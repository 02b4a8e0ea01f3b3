"""An event loop on a virtual clock, the clock the unit lane injects into the gateway's
batcher and Triton's supervisor (both read the running loop's ``time()``).

The loop never waits for a timer: when nothing is ready it moves its clock to the next timer
at once. A test's ``asyncio.sleep(0.05)`` takes no real time and exactly 0.05 s of loop time,
so waits, retry hints and backoffs come out exact whatever the machine's load.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable, Coroutine
from typing import TypeVar

T = TypeVar("T")


class _SkippingSelector(selectors.DefaultSelector):
    """Polls without blocking, and moves ``clock`` by the time it was asked to block."""

    def __init__(self, clock: VirtualClockLoop):
        super().__init__()
        self.clock = clock

    def select(self, timeout: float | None = None):
        if timeout is None:  # no timer at all: only another thread can wake the loop
            return super().select(None)
        events = super().select(0)
        if not events:
            self.clock.advance(timeout)
        return events


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An asyncio loop whose ``time()`` starts at 0 and moves only by :meth:`advance`, which
    it calls itself instead of waiting for its next timer."""

    def __init__(self):
        self.now = 0.0
        super().__init__(_SkippingSelector(self))

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock, as a callback that kept the loop busy for ``seconds`` would."""
        self.now += seconds


def run_on_virtual_clock(main: Coroutine[object, object, T]) -> T:
    """``asyncio.run(main)`` on a :class:`VirtualClockLoop`."""
    with asyncio.Runner(loop_factory=VirtualClockLoop) as runner:
        return runner.run(main)


async def wait_until(condition: Callable[[], bool], timeout_s: float, poll_s: float = 0.01) -> None:
    """Poll ``condition`` on the running loop every ``poll_s`` until it holds; TimeoutError
    after ``timeout_s`` of the loop's time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            raise TimeoutError(f"the condition did not hold within {timeout_s} s")
        await asyncio.sleep(poll_s)
