"""The gateway's contract in front of the real vllm-router (fake upstreams)."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
from pathlib import Path

import httpx
import openai
import pytest

from codefleet.errors import SecretError
from codefleet.gateway.config import GatewayConfig, hash_keys
from codefleet.manifest import ApiKeys, Limits
from codefleet.router import ClientKey, load_api_keys
from tests.router.conftest import KEY, Fakes, start_fakes


def sdk(fakes: Fakes, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=fakes.url + "/v1", api_key=key, max_retries=0)


def test_models_list_and_retrieve(fakes: Fakes) -> None:
    assert [m.id for m in sdk(fakes).models.list()] == ["alpha", "beta", "empty"]
    assert sdk(fakes).models.retrieve("beta").owned_by == "codefleet"


def test_requests_route_by_model(fakes: Fakes) -> None:
    for model in ("alpha", "beta"):
        out = sdk(fakes).chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=3)
        assert out.model == model and out.choices[0].message.content == "xxx"
        chunks = list(sdk(fakes).completions.create(model=model, prompt="x", max_tokens=4, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == "xxxx"


def test_unknown_model_404(fakes: Fakes) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        sdk(fakes).completions.create(model="gamma", prompt="x")
    assert info.value.code == "model_not_found" and info.value.param == "model"


def test_model_without_replica_is_a_503_with_retry_after(fakes: Fakes) -> None:
    resp = httpx.post(fakes.url + "/v1/completions", json={"model": "empty", "prompt": "x"},
                      headers={"Authorization": f"Bearer {KEY}"})
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "5"
    assert resp.json()["error"]["code"] == "model_unavailable"


@pytest.mark.parametrize("header", [None, "Bearer nope", "Basic " + KEY, "Bearer"])
def test_bad_credentials_are_401(fakes: Fakes, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models/alpha")):
        resp = httpx.request(method, fakes.url + path, json={"model": "alpha"}, headers=headers)
        assert resp.status_code == 401, (path, resp.text)
        assert resp.json()["error"]["code"] == "invalid_api_key"


def test_health_needs_no_key(fakes: Fakes) -> None:
    assert httpx.get(fakes.url + "/health").status_code == 200


def test_wrong_method_and_path(fakes: Fakes) -> None:
    h = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(fakes.url + "/v1/chat/completions", headers=h).status_code == 405
    assert httpx.post(fakes.url + "/v1/nothing", headers=h).status_code == 404


def test_oversized_body_without_content_length(fakes: Fakes) -> None:
    def chunks():  # chunked transfer: the size is only known while reading
        yield b'{"model": "alpha", "prompt": "'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"}'
    resp = httpx.post(fakes.url + "/v1/completions", content=chunks(),
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert resp.status_code == 413


def test_stream_cut_by_a_dying_upstream_ends_with_an_openai_error(tmp_path: Path) -> None:
    own = start_fakes(tmp_path, ("slow-dying",), KEY)  # its own front: the shared one is not changed
    try:
        own.add_upstream("slow-dying", "--token-delay-ms", "100")
        pgid = own.upstreams["slow-dying"][0][1]
        stream = sdk(own).completions.create(model="slow-dying", prompt="x", max_tokens=50, stream=True)
        got = []
        with pytest.raises(openai.APIError) as info:
            for i, chunk in enumerate(stream):
                got.append(chunk)
                if i == 3:
                    os.killpg(pgid, signal.SIGKILL)
        assert len(got) >= 4
        assert "interrupted" in info.value.message
    finally:
        own.stop()


def test_gateway_restart_keeps_serving(fakes: Fakes) -> None:
    assert fakes.frontend.gateway_proc is not None
    fakes.frontend.gateway_proc.send_signal(signal.SIGKILL)
    fakes.frontend.gateway_proc.wait()
    dead = fakes.frontend.gateway_proc.pid
    fakes.frontend.check()
    assert fakes.frontend.gateway_proc.pid != dead and fakes.frontend.gateway_proc.poll() is None
    assert sdk(fakes).completions.create(model="alpha", prompt="x", max_tokens=1).choices[0].text == "x"


def test_config_round_trip(tmp_path: Path) -> None:
    cfg = GatewayConfig(router_url="http://127.0.0.1:1", models=("a", "b"), key_sha256=hash_keys(["sk-plain-1"]),
                        limits=Limits(header_timeout_s=3))
    (tmp_path / "g.json").write_text(cfg.to_json())
    assert GatewayConfig.from_file(tmp_path / "g.json") == cfg
    assert "sk-plain-1" not in cfg.to_json()  # only the digest is written


def test_api_keys_from_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def sha(k: str) -> str:
        return hashlib.sha256(k.encode()).hexdigest()

    monkeypatch.setenv("CF_KEYS", " a, b ,,")
    assert load_api_keys(ApiKeys(env="CF_KEYS"), tmp_path) == [ClientKey("default", sha("a")),
                                                                ClientKey("default", sha("b"))]
    digest = sha("held-elsewhere")
    (tmp_path / "k.txt").write_text(f"# comment\nk1\n\n  team-a:k2  \nteam-b:sha256:{digest.upper()}\n")
    assert load_api_keys(ApiKeys(file="k.txt"), tmp_path) == [
        ClientKey("default", sha("k1")), ClientKey("team-a", sha("k2")), ClientKey("team-b", digest)]
    # with tenants in the manifest every key must name one of them: the error names file and line, not the key
    with pytest.raises(SecretError) as e:
        load_api_keys(ApiKeys(file="k.txt"), tmp_path, ("team-a", "team-b"))
    assert "k.txt:2: tenant 'default' is not in the manifest's tenants (team-a, team-b)" in str(e.value)
    assert "k1" not in str(e.value).replace("k.txt", "")
    (tmp_path / "bad.txt").write_text("team-a:sha256:abc\n")
    with pytest.raises(SecretError, match=r"bad.txt:1: sha256: must be followed by 64 hex digits"):
        load_api_keys(ApiKeys(file="bad.txt"), tmp_path)
    monkeypatch.delenv("CF_KEYS")
    with pytest.raises(SecretError, match="CF_KEYS is unset or empty"):
        load_api_keys(ApiKeys(env="CF_KEYS"), tmp_path)
    with pytest.raises(SecretError, match="cannot read .*missing.txt"):
        load_api_keys(ApiKeys(file="missing.txt"), tmp_path)
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(SecretError, match="holds no key"):
        load_api_keys(ApiKeys(file="empty.txt"), tmp_path)


def _raw(fakes: Fakes, data: bytes, expect: int, timeout: float = 10) -> bytes:
    """Send raw bytes to the gateway and read until ``expect`` responses have ended."""
    host, port = fakes.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(data)
        got = b""
        while got.count(b"HTTP/1.1 ") - got.count(b"HTTP/1.1 100 ") < expect or not got.endswith((b"}", b"\n\n", b"ok")):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


def test_pipelined_requests_are_answered_in_order(fakes: Fakes) -> None:
    auth = f"Authorization: Bearer {KEY}\r\n".encode()
    got = _raw(fakes, b"GET /v1/models/beta HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n"
                      b"GET /v1/models/gamma HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n"
                      b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", expect=3)
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", got)
    assert statuses == [b"200", b"404", b"200"], got
    assert got.index(b'"beta"') < got.index(b"gamma")


def test_expect_100_continue_and_malformed_http(fakes: Fakes) -> None:
    body = b'{"model": "alpha", "prompt": "x", "max_tokens": 2}'
    got = _raw(fakes, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
               + b"\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: "
               + str(len(body)).encode() + b"\r\n\r\n" + body, expect=1)
    assert got.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"), got
    assert b'"text":"xx"' in got.replace(b" ", b"")
    bad = _raw(fakes, b"GET /v1/models HTTP/1.1\r\nHost x\r\n\r\n", expect=1)
    assert bad.startswith(b"HTTP/1.1 400 ") and b"Malformed HTTP request" in bad
