"""How to reach the broker: :func:`connect`, its options, and TLS."""

from __future__ import annotations

import os
import ssl as sslmod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generator, Iterator, NamedTuple

from ._common import ALPN, Seconds, _seconds
from .names import validate_name

if TYPE_CHECKING:
    from .client import Client


def tls_context(
    ca: str | os.PathLike[str],
    cert: str | os.PathLike[str] | None = None,
    key: str | os.PathLike[str] | None = None,
) -> sslmod.SSLContext:
    """A TLS 1.3 context that trusts only the CA in ``ca`` (PEM), offers ALPN
    ``courier/1`` and, with ``cert`` and ``key``, presents that client
    certificate (for brokers started with ``--tls-client-ca``)."""
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs both cert and key")
    ctx = sslmod.SSLContext(sslmod.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = sslmod.TLSVersion.TLSv1_3
    try:
        ctx.load_verify_locations(cafile=os.fspath(ca))
    except (OSError, sslmod.SSLError) as e:
        raise ValueError(f"cannot use the TLS CA file {os.fspath(ca)}: {e}") from e
    if cert is not None and key is not None:
        try:
            ctx.load_cert_chain(os.fspath(cert), os.fspath(key))
        except (OSError, sslmod.SSLError) as e:
            raise ValueError(
                f"cannot use the client certificate {os.fspath(cert)} with key {os.fspath(key)}: {e}"
            ) from e
    ctx.set_alpn_protocols([ALPN])
    return ctx


class _Address(NamedTuple):
    """One broker address of ``url``: as written, and split."""

    text: str
    host: str
    port: int


@dataclass(frozen=True)
class _Options:
    url: str
    addresses: tuple[_Address, ...]
    service: str
    instance: str
    token: str | None
    ssl: sslmod.SSLContext | None
    server_hostname: str | None
    max_in_flight: int
    max_concurrency: int
    send_timeout: float
    request_timeout: float
    ack_deadline: float | None
    max_deliveries: int | None
    nack_delay: float
    reconnect_delay_min: float
    reconnect_delay_max: float
    drain_timeout: float
    handshake_timeout: float
    ping_interval: float
    idle_timeout: float


def _parse_addresses(url: str) -> list[str]:
    """``url`` split at its commas, each address trimmed; an empty entry
    (``a:1,,b:2``, or a trailing comma) is an error that says what to write."""
    addresses = [address.strip() for address in url.split(",")]
    if any(not address for address in addresses):
        raise ValueError(
            f"the broker address {url!r} (COURIER_URL or connect's url) has an empty entry; "
            "write HOST:PORT, or several separated by commas: 127.0.0.1:7701,127.0.0.1:7702"
        )
    return addresses


def _rotation(count: int, last: int | None) -> Iterator[int]:
    """The order in which one connection attempt tries ``count`` addresses:
    from the one after ``last`` (the address connected to last), round to
    ``last`` itself, so a client whose broker died goes on to the next
    without waiting on the dead one first; from the first when none was
    connected to yet."""
    start = 0 if last is None else last + 1
    return ((start + k) % count for k in range(count))


def _split_url(url: str) -> tuple[str, int]:
    text = url.split("://", 1)[-1].rstrip("/")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":") or "7700"
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, "7700"
    try:
        return host, int(port)
    except ValueError:
        raise ValueError(f"broker address {url!r} is not host:port (e.g. 127.0.0.1:7700)") from None


class _Connect:
    """What :func:`connect` returns: await it for a :class:`Client`, or use
    it as ``async with`` to close the client at the end of the block."""

    def __init__(self, options: _Options) -> None:
        self._options = options
        self._client: Client | None = None

    def __await__(self) -> Generator[Any, None, Client]:
        return self._open().__await__()

    async def _open(self) -> Client:
        from .client import Client  # here: the client module imports this one

        client = Client(self._options)
        await client._connect_first()
        return client

    async def __aenter__(self) -> Client:
        self._client = await self._open()
        return self._client

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            await self._client.close()


def connect(
    url: str = "127.0.0.1:7700",
    service: str = "",
    *,
    instance: str = "",
    token: str | None = None,
    ssl: sslmod.SSLContext | None = None,
    server_hostname: str | None = None,
    max_in_flight: int = 64,
    max_concurrency: int | None = None,
    send_timeout: Seconds = 30.0,
    request_timeout: Seconds = 30.0,
    ack_deadline: Seconds | None = None,
    max_deliveries: int | None = None,
    nack_delay: Seconds = 1.0,
    reconnect_delay_min: Seconds = 0.05,
    reconnect_delay_max: Seconds = 5.0,
    drain_timeout: Seconds = 30.0,
    handshake_timeout: Seconds = 10.0,
    ping_interval: Seconds = 10.0,
    idle_timeout: Seconds = 30.0,
) -> _Connect:
    """Connects to the broker at ``url`` (``host:port``, or several brokers
    separated by commas) as ``service``.

    ``await connect(...)`` returns a connected :class:`Client` (or raises
    :class:`ConnectError` / :class:`Refused` at once); ``async with
    connect(...) as client:`` also closes it gracefully at the end. After
    the first connection the client reconnects by itself.

    - ``service``: the service this instance belongs to; empty lets the
      token (or the TLS client certificate) decide, on brokers with a
      manifest. ``instance``: this instance's name (empty: the broker's).
    - ``token``: credentials for brokers with a manifest.
    - ``ssl``: TLS to the broker (see :func:`tls_context`);
      ``server_hostname`` overrides the name the certificate must carry.
    - ``max_in_flight``: deliveries the broker may have outstanding on this
      connection (flow control); ``max_concurrency``: handlers running at
      once (default: ``max_in_flight``; 1 handles in delivery order).
    - ``ack_deadline``, ``max_deliveries``: asked for this service's
      subscriptions (``None`` keeps the broker's).
    - ``nack_delay``: redelivery delay after a handler raised.
    - ``ping_interval``, ``idle_timeout``: keep-alive; a connection on which
      nothing arrived for ``idle_timeout`` is given up and reconnected.

    With several addresses (``127.0.0.1:7701,127.0.0.1:7702``, the nodes of
    a cluster) each connection attempt, the first and every reconnect,
    tries them in turn — the first in the order written, a reconnect from
    the one after the address connected to last — each within
    ``handshake_timeout``; TLS checks each broker's certificate against
    that address's own host unless ``server_hostname`` is given.
    """
    addresses = tuple(_Address(text, *_split_url(text)) for text in _parse_addresses(url))
    if max_in_flight < 0 or max_in_flight > 0xFFFF_FFFF:
        raise ValueError(f"max_in_flight must be 0..{0xFFFF_FFFF}, not {max_in_flight}")
    concurrency = max_concurrency if max_concurrency is not None else max(max_in_flight, 1)
    if concurrency < 1:
        raise ValueError(f"max_concurrency must be at least 1, not {concurrency}")
    if service:
        validate_name(service)
    return _Connect(
        _Options(
            url=url,
            addresses=addresses,
            service=service,
            instance=instance,
            token=token,
            ssl=ssl,
            server_hostname=server_hostname,
            max_in_flight=max_in_flight,
            max_concurrency=concurrency,
            send_timeout=_seconds(send_timeout),
            request_timeout=_seconds(request_timeout),
            ack_deadline=None if ack_deadline is None else _seconds(ack_deadline),
            max_deliveries=max_deliveries,
            nack_delay=_seconds(nack_delay),
            reconnect_delay_min=_seconds(reconnect_delay_min),
            reconnect_delay_max=_seconds(reconnect_delay_max),
            drain_timeout=_seconds(drain_timeout),
            handshake_timeout=_seconds(handshake_timeout),
            ping_interval=_seconds(ping_interval),
            idle_timeout=_seconds(idle_timeout),
        )
    )


def connect_from_env(**overrides: Any) -> _Connect:
    """:func:`connect` with ``COURIER_URL`` (default ``127.0.0.1:7700``;
    several brokers separated by commas),
    ``COURIER_SERVICE`` (default: the token's service, else ``cli``),
    ``COURIER_TOKEN``, and TLS trusting ``COURIER_TLS_CA`` when set, with
    the client certificate of ``COURIER_TLS_CERT``/``COURIER_TLS_KEY``.
    Keyword arguments override the environment."""
    env = os.environ
    kwargs: dict[str, Any] = {"url": env.get("COURIER_URL", "127.0.0.1:7700")}
    if env.get("COURIER_TOKEN"):
        kwargs["token"] = env["COURIER_TOKEN"]
    ca = env.get("COURIER_TLS_CA")
    if ca:
        kwargs["ssl"] = tls_context(ca, env.get("COURIER_TLS_CERT"), env.get("COURIER_TLS_KEY"))
    kwargs["service"] = env.get("COURIER_SERVICE") or (
        "" if "token" in kwargs or env.get("COURIER_TLS_CERT") else "cli"
    )
    kwargs.update(overrides)
    return connect(**kwargs)
