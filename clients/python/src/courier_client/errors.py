"""What can go wrong talking to the broker."""

from __future__ import annotations

from ._base import CourierError
from .protocol import DecodeError, EncodeError, ErrorCode, error_code, error_code_name

__all__ = [
    "AlreadySettled",
    "ClientClosed",
    "ConnectError",
    "ConnectionLost",
    "CourierError",
    "CourierTimeout",
    "DecodeError",
    "EncodeError",
    "InvalidName",
    "Nack",
    "Refused",
]


class Refused(CourierError):
    """The broker refused a message, a subscription or the connection.

    ``code`` is the broker's :class:`~courier_client.protocol.ErrorCode`
    (an ``int`` for a code this client does not know); ``reason`` its words.
    """

    def __init__(self, code: int, reason: str) -> None:
        self.code: ErrorCode | int = error_code(code)
        self.reason = reason
        super().__init__(f"refused by the broker: {reason} [{self.code_name} ({int(code)})]")

    @property
    def code_name(self) -> str:
        """The code as the protocol names it: ``no_receiver``."""
        return error_code_name(int(self.code))


class CourierTimeout(CourierError, TimeoutError):
    """No answer (acceptance, reply, drain) in time."""


class ConnectError(CourierError, ConnectionError):
    """The broker could not be reached or the handshake failed."""


class ConnectionLost(CourierError, ConnectionError):
    """The connection ended before the broker answered."""


class ClientClosed(CourierError):
    """The client is closed (or closing) and takes no more work."""


class AlreadySettled(CourierError):
    """This delivery was already acked or nacked."""


class InvalidName(CourierError, ValueError):
    """A message name, service name or pattern breaks the naming rules."""


class Nack(Exception):
    """Raise from a handler to nack the delivery: the broker redelivers it
    no sooner than ``delay`` seconds from now (``None``: the client's
    ``nack_delay``)::

        async def handle(msg):
            if not ready():
                raise Nack(delay=5)
    """

    def __init__(self, reason: str = "", *, delay: float | None = None) -> None:
        super().__init__(reason or "nacked by the handler")
        self.delay = delay
