"""Who may call the server: with a key, whoever has it; without one (the default, on loopback),
only clients that address this server by its own name and are not other origins' web pages."""

from __future__ import annotations

import httpx
import pytest
from typer.testing import CliRunner

from flashmoe.cli import app

from .conftest import API_KEY

CHAT = "/v1/chat/completions"
BODY = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}'


def _post(server, path: str = CHAT, **headers: str) -> httpx.Response:
    # A form POST as a page on another site could send it: text/plain needs no CORS preflight.
    return httpx.post(server.url + path, content=BODY if path == CHAT else b"{}", timeout=60,
                      headers={"Content-Type": "text/plain", **headers})


def test_keyless_server_answers_requests_addressed_to_it(keyless_server):
    port = keyless_server.port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
        assert _post(keyless_server, Host=host).status_code == 200, host
    same_page = _post(keyless_server, Host=f"localhost:{port}", Origin=f"http://localhost:{port}")
    assert same_page.status_code == 200


@pytest.mark.parametrize("headers", [
    {"Host": "attacker.example:{port}"},  # DNS rebinding: the attacker's name, resolving to 127.0.0.1
    {"Host": "127.0.0.1:1"},  # another port
    {"Host": "attacker.example@127.0.0.1:{port}"},
    {"Origin": "http://attacker.example"},  # a cross-site form POST
    {"Origin": "null"},  # a sandboxed page
    {"Origin": "http://127.0.0.1:1"},
])
def test_keyless_server_refuses_other_names_and_origins(keyless_server, headers):
    headers = {k: v.format(port=keyless_server.port) for k, v in headers.items()}
    r = _post(keyless_server, **headers)
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error", r.text
    assert ("Host" if "Host" in headers else "origin") in r.json()["error"]["message"]  # says which check refused
    anthropic = _post(keyless_server, "/v1/messages", **headers)
    assert anthropic.status_code == 403 and anthropic.json()["type"] == "error"  # Anthropic's shape there


def test_keyed_server_leaves_host_and_origin_to_the_key(server):
    r = _post(server, Origin="http://attacker.example", Authorization=f"Bearer {API_KEY}")
    assert r.status_code == 200
    assert _post(server, Origin="http://attacker.example").status_code == 401


def test_serve_refuses_a_public_address_without_a_key(tmp_path, monkeypatch):
    monkeypatch.delenv("FLASHMOE_API_KEY", raising=False)
    missing = str(tmp_path / "no-model")
    refused = CliRunner().invoke(app, ["serve", "--model", missing, "--host", "0.0.0.0"])
    assert refused.exit_code == 2 and "--insecure-no-key" in refused.output
    # With the flag, the check passes and the next problem is the (missing) model itself.
    allowed = CliRunner().invoke(app, ["serve", "--model", missing, "--host", "0.0.0.0", "--insecure-no-key"])
    assert allowed.exit_code == 2 and "--insecure-no-key" not in allowed.output and "no-model" in allowed.output
