"""Live sessions of one gateway process: admission under a cap, and the mailbox each result lands in.

Threading contract: the pub/sub listener thread (``gateway.results``) calls ``Session.deliver``. Whoever
holds ``Session.lock`` owns the session's state and its socket for sending. The handler thread takes it
whenever it wakes; while it sleeps, ``deliver`` may forward the result itself through ``direct``, on the
listener thread, which saves the hand-off to the handler thread (measured: docs/benchmarks.md) but only
when that cannot wait: the lock is free (never waited for), nothing older is in the mailbox (order is
kept) and ``direct`` agrees (it refuses when the socket could block, so a slow client never holds up the
listener and every other session). Otherwise the result goes to the mailbox and the wake event, the same
event simple-websocket sets when a client message arrives, so the handler sleeps on one event and wakes
for either.
"""

from __future__ import annotations

import collections
import secrets
import threading
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Session:
    """One open websocket. ``mailbox`` holds raw result messages (JSON bytes) from the workers."""

    sid: str
    wake: threading.Event
    #: At most this many undelivered results are kept; older ones are discarded (the client only
    #: draws the newest, and it keeps at most two frames in flight, so this never fills in practice).
    mailbox_size: int = 8
    mailbox: collections.deque = field(default_factory=collections.deque)
    #: Forward one result now, on the caller's thread, with ``lock`` held; returns False to decline.
    direct: Callable[[bytes], bool] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.mailbox = collections.deque(maxlen=self.mailbox_size)

    def deliver(self, message: bytes) -> None:
        direct = self.direct
        if direct is not None and self.lock.acquire(blocking=False):
            try:
                if not self.mailbox and direct(message):
                    return
            finally:
                self.lock.release()
        self.mailbox.append(message)  # deque.append is atomic under the GIL
        self.wake.set()

    def take_all(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.mailbox.popleft())
            except IndexError:
                return out


def new_session_id() -> str:
    """A random, unguessable session id (it names the session's Redis keys and result channel)."""
    return secrets.token_hex(12)


class SessionRegistry:
    """The sessions of this process, admitted while fewer than ``limit`` are open."""

    def __init__(self, limit: int):
        self.limit = limit
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}

    def admit(self, session: Session) -> bool:
        """Register ``session`` unless the process is full. Returns whether it was admitted."""
        with self._lock:
            if len(self._sessions) >= self.limit:
                return False
            self._sessions[session.sid] = session
            return True

    def remove(self, sid: str) -> None:
        with self._lock:
            self._sessions.pop(sid, None)

    def get(self, sid: str) -> Session | None:
        return self._sessions.get(sid)

    def __len__(self) -> int:
        return len(self._sessions)
