"""The one small interface every transport implements, so services pick a backend by name.

Delivery is at most once: a message in flight when a peer dies is lost, never duplicated or
corrupted. Callers that need a reply (an encode job, a health ping) time out and retry, possibly
on another peer.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

from transfer.messages import Message


class TransportError(RuntimeError):
    """A transport cannot do what was asked; the text says what to change."""


class TransportTimeout(TransportError):
    """send() could not hand the message over in time: the receiver is slow, stalled or gone.

    This is backpressure, not a failure of the message; the caller may retry, wait, or pick
    another peer.
    """


@dataclass
class ReceiverStats:
    received: int = 0  # messages returned by recv()
    rejected: int = 0  # messages dropped because they failed validation (each one logged)


class Sender(abc.ABC):
    """Connects to one receiver address and sends messages to it."""

    @abc.abstractmethod
    def send(self, msg: Message, timeout: float | None = None) -> None:
        """Queue `msg` for delivery. Blocks while the receiver pushes back; raises
        TransportTimeout if it still does after `timeout` seconds (None: wait for ever)."""

    def send_many(self, msgs: list[Message], timeout: float | None = None) -> None:
        """Queue `msgs` for delivery, in order, as send() does for each (`timeout` applies to each
        message's wait)."""
        for msg in msgs:
            self.send(msg, timeout)

    @abc.abstractmethod
    def close(self) -> None:
        """Release sockets and buffers; pending messages may be dropped."""

    def __enter__(self) -> Sender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Receiver(abc.ABC):
    """Binds an address; many senders may connect to it."""

    address: str  # where senders connect, resolved (a tcp port of 0 or * is replaced)
    stats: ReceiverStats

    @abc.abstractmethod
    def recv(self, timeout: float | None = None) -> Message | None:
        """The next valid message, or None after `timeout` seconds (None: wait for ever).

        Invalid messages are logged with their reason, counted in stats.rejected and skipped;
        they never raise here, so one bad peer cannot stop the service."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release sockets and buffers."""

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
