"""TLS (server and client certificates) and tokens with a manifest."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Callable

import pytest
from support import Broker

from courier_client import ConnectError, ErrorCode, Incoming, Refused, connect, tls_context


def dev_certs(courier_bin: str, where: Path) -> Path:
    subprocess.run([courier_bin, "dev-certs", str(where)], check=True, capture_output=True)
    return where


def token_pair(courier_bin: str) -> tuple[str, str]:
    lines = subprocess.run([courier_bin, "token", "new"], check=True, capture_output=True, text=True).stdout.split()
    assert lines[1].startswith("sha256:")
    return lines[0], lines[1]


def manifest(path: Path, web: str, todo: str, admin: str) -> Path:
    path.write_text(
        f"""[services.web]
sends = ["todo.create@1"]
receives = ["todo.created@1"]
tokens = ["{web}"]
certificates = ["CN=web"]

[services.todo]
receives = ["todo.create@1"]
sends = ["todo.created@1"]
tokens = ["{todo}"]

[admin]
tokens = ["{admin}"]
"""
    )
    return path


async def reply_created(msg: Incoming) -> None:
    await msg.reply("todo.created", {"for": msg.sender})


async def test_tls_with_client_certificates_and_tokens(
    courier_bin: str, tmp_dir: Path, start_broker: Callable[..., Broker]
) -> None:
    certs = dev_certs(courier_bin, tmp_dir / "certs")
    other = dev_certs(courier_bin, tmp_dir / "other")
    todo_token, todo_hash = token_pair(courier_bin)
    _, web_hash = token_pair(courier_bin)
    _, admin_hash = token_pair(courier_bin)
    broker = start_broker(
        "--manifest",
        str(manifest(tmp_dir / "courier.toml", web_hash, todo_hash, admin_hash)),
        "--tls-cert",
        str(certs / "server.pem"),
        "--tls-key",
        str(certs / "server-key.pem"),
        "--tls-client-ca",
        str(certs / "ca.pem"),
    )
    ca = certs / "ca.pem"
    # todo: TLS without a client certificate, authenticated by its token.
    async with connect(broker.addr, "", token=todo_token, ssl=tls_context(ca)) as todo:
        await todo.on("todo.create", reply_created)
        # web: its certificate (CN=web) decides the service; no token.
        web_tls = tls_context(ca, certs / "web.pem", certs / "web-key.pem")
        async with connect(broker.addr, "", ssl=web_tls) as web:
            assert web.service == "web", "WELCOME names the service the certificate decided"
            reply = await web.request("todo.create", {})
            assert reply.json() == {"for": "web"}
            assert reply.sender == "todo"
        assert todo.service == "todo", "WELCOME names the service the token decided"

    # Plain TCP on the TLS port: the broker says TLS is required.
    with pytest.raises(Refused) as plain:
        await connect(broker.addr, "todo", token=todo_token)
    assert plain.value.code == ErrorCode.HANDSHAKE_REQUIRED
    assert "TLS" in plain.value.reason
    # A broker certificate from a CA this client does not trust.
    with pytest.raises(ConnectError, match="not signed by the trusted CA"):
        await connect(broker.addr, "todo", token=todo_token, ssl=tls_context(other / "ca.pem"))
    # A client certificate the broker's client CA did not sign.
    stranger = tls_context(ca, other / "web.pem", other / "web-key.pem")
    with pytest.raises(ConnectError, match="TLS|client certificate"):
        await connect(broker.addr, "", ssl=stranger, handshake_timeout=5)
    # A TLS client on a plain port.
    plain_broker = start_broker("--in-memory")
    with pytest.raises(ConnectError, match="is the broker listening with TLS"):
        await connect(plain_broker.addr, "web", ssl=tls_context(ca))


def test_tls_context_names_the_file_it_cannot_use(tmp_dir: Path) -> None:
    with pytest.raises(ValueError, match="cannot use the TLS CA file"):
        tls_context(tmp_dir / "missing.pem")
    with pytest.raises(ValueError, match="needs both cert and key"):
        tls_context(tmp_dir / "ca.pem", cert=tmp_dir / "web.pem")


async def test_tokens_decide_the_service_and_the_manifest_what_it_sends(
    courier_bin: str, tmp_dir: Path, start_broker: Callable[..., Broker]
) -> None:
    web_token, web_hash = token_pair(courier_bin)
    todo_token, todo_hash = token_pair(courier_bin)
    admin_token, admin_hash = token_pair(courier_bin)
    broker = start_broker("--manifest", str(manifest(tmp_dir / "courier.toml", web_hash, todo_hash, admin_hash)))

    with pytest.raises(Refused) as no_token:
        await connect(broker.addr, "web")
    assert no_token.value.code == ErrorCode.UNAUTHORIZED
    with pytest.raises(Refused) as wrong:
        await connect(broker.addr, "web", token="crr_guess")
    assert wrong.value.code == ErrorCode.UNAUTHORIZED
    with pytest.raises(Refused, match="belongs to service web") as spoof:
        await connect(broker.addr, "todo", token=web_token)
    assert spoof.value.code == ErrorCode.UNAUTHORIZED

    async with connect(broker.addr, "", token=todo_token) as todo, connect(broker.addr, "web", token=web_token) as web:
        assert (todo.service, web.service) == ("todo", "web")
        await todo.on("todo.create", reply_created)
        reply = await web.request("todo.create", {})
        assert reply.json() == {"for": "web"} and reply.sender == "todo"
        with pytest.raises(Refused) as outside:
            await web.publish("todo.deleted", {})
        assert outside.value.code == ErrorCode.UNAUTHORIZED
        assert "todo.deleted" in outside.value.reason
    # The admin's token makes the connection `admin`, whatever it asked for.
    # Broker commands are requests like any other.
    async with connect(broker.addr, "web", token=admin_token) as admin:
        assert admin.service == "admin"
        listing = await admin.request("courier.services.list")
        assert listing.name == "courier.services.listing" and listing.sender == "courier"
        (todo_row,) = [row for row in listing.json() if row["name"] == "todo"]
        assert todo_row["patterns"] == ["todo.create"]
        async with connect(broker.addr, "web", token=web_token) as web:
            with pytest.raises(Refused) as not_admin:
                await web.request("courier.services.list")
            assert not_admin.value.code == ErrorCode.UNAUTHORIZED
