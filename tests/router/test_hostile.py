"""The endpoint as an attacker meets it: raw sockets, no key, hostile framing and pacing.

The gateway runs as its own process with tight limits (timeouts of 1-2 s) in front of a fake
upstream standing in for the router (the gateway's limits are under test, not routing). Every
case is bounded in time; memory is read from the gateway's RSS. Nothing refused may reach the
upstream: its request counter is compared before and after.
"""

from __future__ import annotations

import json
import re
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import psutil
import pytest

from codefleet.gateway.config import GatewayConfig, hash_keys
from codefleet.manifest import Limits
from codefleet.procs import free_port, spawn, stop_group, wait_healthy

KEY = "sk-hostile-test"
AUTH = f"Authorization: Bearer {KEY}\r\n".encode()
LIMITS = Limits(header_timeout_s=1.5, body_timeout_s=1.0, body_min_bytes_per_s=100, keepalive_timeout_s=1.0,
                send_timeout_s=2.0, max_connections=32, max_pipelined=8)
MAX_BODY = 1024 * 1024


@dataclass
class Gate:
    port: int
    pid: int
    upstream: str
    metrics: str

    def connect(self, timeout: float = 5.0) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    def rss(self) -> int:
        return int(psutil.Process(self.pid).memory_info().rss)

    def evicted(self) -> float:
        text = httpx.get(self.metrics + "/metrics", timeout=5).text
        m = re.search(r"^codefleet_gateway_connections_evicted_total (\S+)", text, re.M)
        return float(m[1]) if m else 0.0

    def upstream_requests(self) -> int:
        text = httpx.get(self.upstream + "/metrics", timeout=5).text
        return int(float(re.search(r"^fake_requests_total (\S+)", text, re.M)[1]))  # type: ignore[index]


@pytest.fixture(scope="module")
def gate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gate]:
    run = tmp_path_factory.mktemp("hostile")
    up_port, port = free_port(), free_port()
    upstream = spawn([sys.executable, "-m", "tests.support.fake_upstream", "--port", str(up_port), "--model", "alpha",
                      "--token-delay-ms", "100"], {}, run / "upstream.log")
    metrics_port = free_port()
    cfg = GatewayConfig(router_url=f"http://127.0.0.1:{up_port}", models=("alpha",), port=port,
                        metrics_port=metrics_port, key_sha256=hash_keys([KEY]), max_body_bytes=MAX_BODY, limits=LIMITS)
    (run / "gateway.json").write_text(cfg.to_json())
    gw = spawn([sys.executable, "-m", "codefleet.gateway", "--config", str(run / "gateway.json")], {},
               run / "gateway.log")
    try:
        wait_healthy(f"http://127.0.0.1:{up_port}", 20, upstream, run / "upstream.log")
        wait_healthy(f"http://127.0.0.1:{port}", 20, gw, run / "gateway.log")
        yield Gate(port, gw.pid, f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{metrics_port}")
    finally:
        stop_group(gw.pid, grace=2)
        stop_group(upstream.pid, grace=2)


def read_all(s: socket.socket, deadline_s: float = 5.0) -> tuple[bytes, float]:
    """Everything the gateway sends until it closes; and how long that took."""
    t0 = time.monotonic()
    s.settimeout(0.2)
    got = b""
    while time.monotonic() - t0 < deadline_s:
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        got += chunk
    return got, time.monotonic() - t0


def statuses(data: bytes) -> list[int]:
    return [int(m) for m in re.findall(rb"HTTP/1\.[01] (\d{3}) ", data)]


def send_quietly(s: socket.socket, data: bytes) -> None:
    try:
        s.sendall(data)
    except OSError:
        pass  # the gateway may already have answered and closed


# -- header limits ------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "head", "status"), [
    ("one 1 MiB header", b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n", 431),
    ("10,000 headers", b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 10_000 + b"\r\n", 431),
    ("150 small headers", b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 150 + b"\r\n", 431),
    ("64 KiB request target", b"GET /v1/models?" + b"q" * 65536 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    ("unterminated 8 MiB header block", b"GET /v1/models HTTP/1.1\r\nX-A: " + b"b" * (8 << 20), 431),
])
def test_oversized_heads_are_refused_early(gate: Gate, name: str, head: bytes, status: int) -> None:
    before = gate.rss()
    with gate.connect() as s:
        send_quietly(s, head)
        got, _ = read_all(s)
    assert statuses(got) == [status], (name, got[:300])
    assert b"Connection: close" in got
    assert gate.rss() - before < 8 << 20, f"{name}: the gateway grew by {(gate.rss() - before) >> 20} MiB"


def test_dribbled_header_is_cut_at_the_limit(gate: Gate) -> None:
    cpu0 = psutil.Process(gate.pid).cpu_times()
    with gate.connect() as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nX-Long: ")
        s.settimeout(0.005)
        sent, got = 0, b""
        try:
            while sent < (1 << 20) and not got:  # 1 MiB of one header, 4 KiB at a time
                s.sendall(b"c" * 4096)
                sent += 4096
                try:
                    got = s.recv(65536)
                except TimeoutError:
                    pass
        except OSError:
            pass
        more, _ = read_all(s)
    cpu1 = psutil.Process(gate.pid).cpu_times()
    assert statuses(got + more) == [431]
    assert sent < 64 * 1024, f"the gateway answered only after {sent} bytes of one header"
    assert (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system) < 1.0


# -- auth and size before the body --------------------------------------------------------------

def test_keyless_huge_upload_is_refused_before_its_body(gate: Gate) -> None:
    before = gate.upstream_requests()
    with gate.connect() as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 10000000000\r\n\r\n")
        s.settimeout(3)
        first = s.recv(65536)
        assert statuses(first) == [401], first
        # The client keeps sending: the gateway drops what arrives and closes within its linger time.
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < 10:
                s.sendall(b"x" * 65536)
        except OSError:
            pass
        assert time.monotonic() - t0 < 6, "the gateway kept reading a refused upload"
    assert gate.upstream_requests() == before


def test_chunk_declaring_more_than_the_limit_gets_413_at_once(gate: Gate) -> None:
    # nginx answers 413 as soon as a chunk size passes client_max_body_size; waiting for the bytes
    # would hold the connection for the body timeout
    before = gate.upstream_requests()
    with gate.connect() as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Content-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n7FFFFFFFFFFFFFFF\r\nxx")
        t0 = time.monotonic()
        s.settimeout(3)
        first = s.recv(65536)
        took = time.monotonic() - t0
    assert statuses(first) == [413], first
    assert took < LIMITS.body_timeout_s / 2, f"413 after {took:.2f} s"
    # the sizes add up: two chunks under the limit each, over it together
    half = f"{MAX_BODY // 2 + 1:x}".encode()
    with gate.connect() as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Transfer-Encoding: chunked\r\n\r\n"
                  + half + b"\r\n")
        send_quietly(s, b"y" * (MAX_BODY // 2 + 1) + b"\r\n" + half + b"\r\n")
        got, _ = read_all(s, 3)
    assert statuses(got) == [413], got[:200]
    assert gate.upstream_requests() == before


@pytest.mark.parametrize("size", [b"-4", b"0x4", b"4_0", b"+4", b"1" * 40])
def test_a_chunk_size_llhttp_refuses_is_a_400_after_a_pause(gate: Gate, size: bytes) -> None:
    # the size arrives in a read of its own (the gateway follows the framing before llhttp sees it):
    # what is not plain hex is left to llhttp, which refuses it; the gateway stays responsive
    with gate.connect() as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Transfer-Encoding: chunked\r\n\r\n")
        time.sleep(0.2)
        send_quietly(s, size + b"\r\nxxxx\r\n")
        got, _ = read_all(s, 3)
    assert statuses(got) == [400], got[:200]
    assert httpx.get(f"http://127.0.0.1:{gate.port}/health", timeout=2).status_code == 200


def test_too_large_content_length_with_expect_gets_413_and_no_continue(gate: Gate) -> None:
    with gate.connect() as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Content-Type: application/json\r\n"
                  b"Expect: 100-continue\r\nContent-Length: " + str(MAX_BODY + 1).encode() + b"\r\n\r\n")
        got, _ = read_all(s, 3)
    assert statuses(got) == [413] and b"100 Continue" not in got


def test_keyless_expect_gets_401_and_no_continue(gate: Gate) -> None:
    with gate.connect() as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 20\r\n\r\n")
        got, _ = read_all(s, 3)
    assert statuses(got) == [401] and b"100 Continue" not in got


def test_parallel_keyless_bodies_hold_no_memory(gate: Gate) -> None:
    before = gate.rss()
    socks = [gate.connect() for _ in range(8)]
    try:
        for s in socks:
            send_quietly(s, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 31457280\r\n\r\n"
                         + b"y" * (4 << 20))
        peak = gate.rss()
    finally:
        for s in socks:
            s.close()
    assert peak - before < 16 << 20, f"8 keyless 30 MiB uploads grew the gateway by {(peak - before) >> 20} MiB"


# -- timeouts -----------------------------------------------------------------------------------

def test_slow_header_gets_408_at_the_header_timeout(gate: Gate) -> None:
    with gate.connect() as s:
        t0 = time.monotonic()
        try:
            for b in b"GET /v1/models HTTP/1.1\r\nHost: x\r\n":
                s.sendall(bytes([b]))
                time.sleep(0.25)
                if time.monotonic() - t0 > 6:
                    break
        except OSError:
            pass
        got, _ = read_all(s, 3)
    assert statuses(got) == [408], got
    assert time.monotonic() - t0 < LIMITS.header_timeout_s + 4


def test_slow_body_gets_408(gate: Gate) -> None:
    with gate.connect() as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Content-Length: 100\r\n\r\n{\"mo")
        got, took = read_all(s, 5)
    assert statuses(got) == [408] and took < LIMITS.body_timeout_s + 2


def test_body_dribbled_below_the_minimum_rate_gets_408(gate: Gate) -> None:
    # each pause (0.3 s) is inside the body timeout (1 s); the average rate is 3 bytes/s, under the
    # 100 bytes/s minimum, so the body is ended once it has taken the body timeout
    with gate.connect() as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Content-Length: 1000\r\n\r\n")
        t0 = time.monotonic()
        got = b""
        s.settimeout(0.3)
        while time.monotonic() - t0 < 8 and not got:
            send_quietly(s, b" ")
            try:
                got = s.recv(65536)
            except TimeoutError:
                pass
        took = time.monotonic() - t0
    assert statuses(got) == [408], got
    assert b"bytes/s" in got and took < LIMITS.body_timeout_s + 2, f"408 after {took:.1f} s"


@pytest.mark.parametrize("first", [b"", b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"], ids=["silent", "idle-keepalive"])
def test_silent_and_idle_connections_are_closed(gate: Gate, first: bytes) -> None:
    with gate.connect() as s:
        if first:
            s.sendall(first)
        got, took = read_all(s, 6)
    limit = LIMITS.keepalive_timeout_s if first else LIMITS.header_timeout_s
    assert took < limit + 2, f"still open after {took:.1f} s"
    assert statuses(got) == ([200] if first else [408])


# -- connections and backpressure ---------------------------------------------------------------

STREAM = json.dumps({"model": "alpha", "prompt": "x", "max_tokens": 30, "stream": True}).encode()


def test_connection_cap_refuses_cleanly_and_recovers(gate: Gate) -> None:
    # every connection has a request in progress (a 3-s stream): nothing can be closed to make room
    held: list[socket.socket] = []
    answers: list[list[int]] = []
    try:
        for _ in range(LIMITS.max_connections + 4):
            s = gate.connect()
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Content-Type: application/json\r\n"
                      b"Content-Length: " + str(len(STREAM)).encode() + b"\r\n\r\n" + STREAM)
            s.settimeout(5)
            held.append(s)
            # its answer has begun (its request is in progress) before the next connection comes
            answers.append(statuses(s.recv(4096)))
        assert answers.count([200]) == LIMITS.max_connections, answers
        assert answers.count([503]) == 4
    finally:
        for s in held:
            s.close()
    time.sleep(0.3)
    r = httpx.get(f"http://127.0.0.1:{gate.port}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=5)
    assert r.status_code == 200


def test_idle_and_headless_connections_do_not_lock_out_a_keyed_client(gate: Gate) -> None:
    # Keyless sockets that never finish a head (and idle keep-alive ones) fill the cap many times
    # over; at the cap the oldest with no request in progress is closed, so a client with a key
    # still gets in, every time, without waiting for the header timeout.
    evicted = gate.evicted()
    socks = []
    try:
        for i in range(300):
            s = gate.connect()
            if i % 3 == 1:
                send_quietly(s, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # a head, never finished
            elif i % 3 == 2:
                send_quietly(s, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # then idle keep-alive
            socks.append(s)
            if i % 100 == 99:
                t0 = time.monotonic()
                r = httpx.post(f"http://127.0.0.1:{gate.port}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                               json={"model": "alpha", "prompt": "x", "max_tokens": 1}, timeout=5)
                assert r.status_code == 200, (i, r.status_code, r.text)
                assert time.monotonic() - t0 < LIMITS.header_timeout_s, "waited for the header timeout"
    finally:
        for s in socks:
            s.close()
    assert gate.evicted() - evicted >= 300 - LIMITS.max_connections


def test_an_upload_in_progress_is_not_closed_at_the_cap(gate: Gate) -> None:
    # a keyed request whose head was accepted is in progress while its body arrives: the idle
    # sockets opened meanwhile close each other, never it
    body = json.dumps({"model": "alpha", "prompt": "x" * 1500, "max_tokens": 1}).encode()
    socks = []
    with gate.connect() as up:
        up.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Content-Type: application/json\r\n"
                   b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:200])
        try:
            sent = 200
            for i in range(3 * LIMITS.max_connections):
                socks.append(gate.connect())
                if i % 8 == 7:  # the upload keeps its pace (the body timeout and minimum rate)
                    up.sendall(body[sent:sent + 150])
                    sent += 150
            up.sendall(body[sent:])
            got, _ = read_all(up, 5)
        finally:
            for s in socks:
                s.close()
    assert statuses(got) == [200], got[:300]


def test_pipelining_client_that_never_reads_is_bounded(gate: Gate) -> None:
    before = gate.rss()
    req = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\n"
    with gate.connect() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(0.5)
        sent = 0
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < 6:
                s.sendall(req * 100)
                sent += 100
        except OSError:
            pass  # the gateway stopped reading (backpressure) or dropped us (send timeout)
        grown = gate.rss() - before
    assert grown < 16 << 20, f"the gateway grew by {grown >> 20} MiB for a client that does not read"
    assert sent < 200_000


# -- protocol -----------------------------------------------------------------------------------

def test_expect_on_a_pipelined_request_waits_for_the_stream_before_it(gate: Gate) -> None:
    stream = json.dumps({"model": "alpha", "prompt": "x", "max_tokens": 5, "stream": True}).encode()
    second = json.dumps({"model": "alpha", "prompt": "y", "max_tokens": 1}).encode()
    with gate.connect() as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Content-Length: "
                  + str(len(stream)).encode() + b"\r\n\r\n" + stream
                  + b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Expect: 100-continue\r\n"
                  b"Content-Length: " + str(len(second)).encode() + b"\r\n\r\n")
        got = b""
        s.settimeout(5)
        while b"100 Continue" not in got:
            chunk = s.recv(65536)
            assert chunk, got
            got += chunk
        s.sendall(second)
        while got.count(b"HTTP/1.1 200") < 2 or not got.endswith(b"}"):
            chunk = s.recv(65536)
            assert chunk, got
            got += chunk
    assert got.index(b"data: [DONE]") < got.index(b"0\r\n\r\n") < got.index(b"HTTP/1.1 100 Continue")


def test_head_has_no_body(gate: Gate) -> None:
    with gate.connect() as s:
        s.sendall(b"HEAD /v1/models HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\nGET /health HTTP/1.1\r\nHost: x\r\n"
                  b"Connection: close\r\n\r\n")
        got, _ = read_all(s)
    assert statuses(got) == [200, 200]
    first, second = got.split(b"HTTP/1.1 200", 2)[1:]
    assert first.endswith(b"\r\n\r\n") and b"Content-Length:" in first and second.endswith(b"ok")


def test_http10_stream_is_not_chunked(gate: Gate) -> None:
    body = json.dumps({"model": "alpha", "prompt": "x", "max_tokens": 3, "stream": True}).encode()
    with gate.connect() as s:
        s.sendall(b"POST /v1/completions HTTP/1.0\r\n" + AUTH + b"Content-Length: " + str(len(body)).encode()
                  + b"\r\n\r\n" + body)
        got, _ = read_all(s)
    head, _, rest = got.partition(b"\r\n\r\n")
    assert statuses(got) == [200] and b"chunked" not in head.lower()
    assert rest.startswith(b"data: ") and rest.endswith(b"data: [DONE]\n\n")


@pytest.mark.parametrize("request_bytes", [
    b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n" + AUTH + b"\r\n",
    b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n" + AUTH + b"\r\n",
], ids=["upgrade", "connect"])
def test_upgrade_and_connect_are_refused_once(gate: Gate, request_bytes: bytes) -> None:
    with gate.connect() as s:
        s.sendall(request_bytes)
        got, _ = read_all(s)
    assert statuses(got) == [400], got


def test_chunked_trailers_are_not_forwarded(gate: Gate) -> None:
    body = json.dumps({"model": "alpha", "prompt": "x", "max_tokens": 1}).encode()
    with gate.connect() as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Transfer-Encoding: chunked\r\n"
                  b"Connection: close\r\n\r\n" + b"%x\r\n" % len(body) + body + b"\r\n0\r\nX-Smuggled: 1\r\n\r\n")
        got, _ = read_all(s)
    assert statuses(got) == [200], got
    seen = json.loads(got.partition(b"\r\n\r\n")[2])["seen_headers"]
    assert "x-smuggled" not in seen and "authorization" not in seen


def test_body_the_engine_would_refuse_is_refused(gate: Gate) -> None:
    before = gate.upstream_requests()
    r = httpx.post(f"http://127.0.0.1:{gate.port}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "alpha", "messages": [{"role": "user", "content": 5}]}, timeout=5)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content"
    assert gate.upstream_requests() == before


def test_answer_cut_mid_body_becomes_a_502(gate: Gate) -> None:
    r = httpx.post(f"http://127.0.0.1:{gate.port}/v1/completions",
                   headers={"Authorization": f"Bearer {KEY}", "X-Fake-Cut": "1"},
                   json={"model": "alpha", "prompt": "x", "max_tokens": 1}, timeout=5)
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unavailable"


def test_gateway_survived(gate: Gate) -> None:
    r = httpx.post(f"http://127.0.0.1:{gate.port}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "alpha", "prompt": "x", "max_tokens": 2}, timeout=5)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "xx"
    assert gate.rss() < 200 << 20
