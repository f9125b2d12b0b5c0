"""The weight preload the chart runs (a Job fills the cache, engines' init containers wait for it)."""

from __future__ import annotations

import inspect
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from codefleet import preload


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    return tmp_path


def test_preload_downloads_what_vllm_loads_then_marks(home: Path) -> None:
    calls: list[tuple[str, Any]] = []

    def snapshot(model: str, **kw: Any) -> str:
        calls.append(("snapshot", model, kw))
        return ""

    def download(model: str, **kw: Any) -> str:
        blob = home / "hub" / "models--org--m" / "blobs" / "w"
        blob.parent.mkdir(parents=True)
        blob.write_bytes(b"x" * 1024)
        calls.append(("weights", model, kw))
        return ""

    done = preload.preload("org/m", "0123abc", download=download, snapshot=snapshot)
    assert done == home / "codefleet-preloaded" / "org--m@0123abc" and done.exists()
    (_, _, side), (_, model, weights) = calls
    assert side == {"revision": "0123abc", "allow_patterns": preload.SIDE_PATTERNS}
    assert model == "org/m" and weights["allow_patterns"] == ["*.safetensors", "*.bin", "*.pt"]
    assert weights["revision"] == "0123abc" and weights["ignore_patterns"] == ["original/**/*"]
    assert preload.cached_bytes("org/m") == 1024


def test_the_arguments_fit_vllms_download_function() -> None:
    """The Job calls vLLM's own download; its signature must take what preload passes."""
    from vllm.model_executor.model_loader.weight_utils import download_weights_from_hf
    inspect.signature(download_weights_from_hf).bind(
        "org/m", cache_dir=None, allow_patterns=preload.WEIGHT_PATTERNS, revision="r",
        ignore_patterns=preload.IGNORE_PATTERNS)


def test_wait_returns_when_the_marker_appears(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mark = preload.marker("org/m", None)
    assert mark == home / "codefleet-preloaded" / "org--m@main"
    threading.Timer(0.3, lambda: (mark.parent.mkdir(parents=True), mark.write_text("1"))).start()
    started = time.monotonic()
    assert preload.wait("org/m", None, timeout=10, poll_s=0.05, progress_s=0.1)
    assert time.monotonic() - started < 5
    out = capsys.readouterr().out
    assert "cached so far" in out and "preloaded" in out


def test_wait_gives_up_and_says_where_to_look(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert not preload.wait("org/m", "r1", timeout=0.2, poll_s=0.05)
    assert "preload Job" in capsys.readouterr().err
    assert preload.main(["org/m", "--revision", "r1", "--wait", "--timeout", "0"]) == 1
