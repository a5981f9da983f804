"""The places large requests take while their bodies are read, decoded and answered (DataPlane.admit): at most a
few at once, in order of arrival. A place can also be taken at once, without waiting, where one is free: the
direct path does so while it parses a request's head, so that a body it may read at once is not first held back
(reading paused at 64 KiB, then resumed: two changes to the loop's poll and a turn of it per request)."""

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator


class Places:
    """`count` places, given in order of arrival; each one taken is given back once."""

    def __init__(self, count: int) -> None:
        self._free = count
        self._waiting: deque[asyncio.Future[None]] = deque()

    def take_now(self) -> bool:
        """Take a place if one is free and nobody waits for one (else the caller waits its turn: `take`)."""
        if self._free and not self._waiting:
            self._free -= 1
            return True
        return False

    async def take(self) -> None:
        if self.take_now():
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # handed a place, then cancelled: pass it on
                self.give_back()
            else:
                with contextlib.suppress(ValueError):  # give_back may have dropped it already
                    self._waiting.remove(turn)
            raise

    def give_back(self) -> None:
        """Hand the place to the first waiter still waiting, else free it."""
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self._free += 1

    @contextlib.asynccontextmanager
    async def held(self, taken: bool = False) -> AsyncIterator[None]:
        """A place for the block: taken here unless `taken` already (take_now), given back after it."""
        if not taken:
            await self.take()
        try:
            yield
        finally:
            self.give_back()
