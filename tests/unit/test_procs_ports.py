"""free_port never hands out the same port twice in one process."""

from __future__ import annotations

import socket

from codefleet import procs


def test_free_port_skips_ports_it_already_handed_out(monkeypatch) -> None:
    # A kernel that gives back the port it just released, as happened in CI.
    ports = iter([41000, 41000, 41000, 41001])

    class FakeSocket:
        def __init__(self, *_: object) -> None:
            self.port = next(ports)

        def __enter__(self) -> FakeSocket:
            return self

        def __exit__(self, *_: object) -> None:
            pass

        def bind(self, _: object) -> None:
            pass

        def getsockname(self) -> tuple[str, int]:
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(procs, "_handed_out", set())
    monkeypatch.setattr(procs.socket, "socket", FakeSocket)
    assert procs.free_port() == 41000
    assert procs.free_port() == 41001


def test_free_port_is_bindable() -> None:
    port = procs.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))

