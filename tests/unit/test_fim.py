"""Fill in the middle: the formats, the catalog's and the manifest's choice, the in-vLLM hook."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from codefleet.catalog import CATALOG
from codefleet.errors import ManifestError
from codefleet.fim import FORMATS, get_format
from codefleet.manifest import parse
from codefleet.planner import plan_fleet
from codefleet.request_defaults import ENV_VAR, RequestDefaults
from tests.unit.test_request_defaults import _run


def test_each_format_renders_its_order() -> None:
    assert get_format("starcoder").render("def f(", "):\n") == "<fim_prefix>def f(<fim_suffix>):\n<fim_middle>"
    assert get_format("starcoder-spm").render("A", "B") == "<fim_prefix><fim_suffix>B<fim_middle>A"
    assert set(FORMATS) == {"starcoder", "starcoder-spm"}  # Code Llama's: not offered (fim.py says why)
    with pytest.raises(KeyError, match="known: starcoder"):
        get_format("deepseek")


def test_every_catalog_entry_says_whether_it_fills_and_why() -> None:
    for entry in CATALOG.values():
        assert entry.fim is None or entry.fim in FORMATS, entry.hf_id
        assert entry.fim_source, f"{entry.hf_id}: no source for its fill-in-the-middle default"
        if entry.fim_token_ids:
            assert set(entry.fim_token_ids) <= set(FORMATS[entry.fim or "starcoder"].markers), entry.hf_id
    assert CATALOG["codefuse-ai/CodeFuse-CodeLlama-34B"].fim is None  # its base, CodeLlama-34b-Python, does not infill


def _manifest(tmp_path: Path, model: str) -> str:
    return f"version: 1\ndefaults: {{gpu: cpu}}\nmodels:\n{model}"


def test_the_manifest_decides_with_the_catalog_as_default(tmp_path: Path) -> None:
    text = _manifest(tmp_path, "  - {name: a, source: ibm-granite/granite-3b-code-instruct-128k}\n"
                               "  - {name: b, source: ibm-granite/granite-3b-code-instruct-128k, fim: false}\n"
                               "  - {name: c, source: ibm-granite/granite-3b-code-instruct-128k, fim: starcoder-spm}\n"
                               "  - {name: d, source: codefuse-ai/CodeFuse-CodeLlama-34B}\n")
    plan = plan_fleet(parse(text, tmp_path / "fleet.yaml"))
    assert [m.generation.fim for m in plan.models] == ["starcoder", None, "starcoder-spm", None]


def test_fim_true_without_a_known_format_is_refused_where_it_is_written(tmp_path: Path) -> None:
    text = _manifest(tmp_path, "  - {name: d, source: codefuse-ai/CodeFuse-CodeLlama-34B, fim: true}\n")
    with pytest.raises(ManifestError) as err:
        plan_fleet(parse(text, tmp_path / "fleet.yaml"))
    message = str(err.value)
    assert "models[0].fim" in message and "does not fill in the middle" in message and "starcoder" in message
    bad = _manifest(tmp_path, "  - {name: d, source: ibm-granite/granite-3b-code-instruct-128k, fim: deepseek}\n")
    with pytest.raises(ManifestError, match="fim"):
        parse(bad, tmp_path / "fleet.yaml")


def test_the_engine_gets_the_format_and_the_gateway_the_capable_models(tmp_path: Path) -> None:
    from codefleet.engine import engine_spec
    from codefleet.frontend_config import frontend_settings

    text = _manifest(tmp_path, "  - {name: a, source: ibm-granite/granite-3b-code-instruct-128k}\n"
                               "  - {name: d, source: codefuse-ai/CodeFuse-CodeLlama-34B}\n")
    plan = plan_fleet(parse(text, tmp_path / "fleet.yaml"))
    env = json.loads(engine_spec(plan.models[0], loopback=True).env[ENV_VAR])
    assert env["fim"] == "starcoder"
    assert "fim" not in json.loads(engine_spec(plan.models[1], loopback=True).env[ENV_VAR])
    assert frontend_settings(plan).fim == {"a": "starcoder"}


class _Vocab:
    def __init__(self, vocab: dict[str, int]) -> None:
        self.vocab = vocab

    def get_vocab(self) -> dict[str, int]:
        return self.vocab


STARCODER_VOCAB = {"<|endoftext|>": 0, "<fim_prefix>": 1, "<fim_middle>": 2, "<fim_suffix>": 3, "<fim_pad>": 4}


def _fim_middleware(monkeypatch: pytest.MonkeyPatch, vocab: dict[str, int]) -> tuple[RequestDefaults, Any]:
    monkeypatch.setenv(ENV_VAR, json.dumps({"stop_tokens": ["<|endoftext|>"], "stop": ["Answer:"], "fim": "starcoder"}))
    renderer = SimpleNamespace(get_tokenizer=lambda: _Vocab(vocab))
    return RequestDefaults(app=None), renderer  # type: ignore[arg-type]


def test_the_hook_renders_a_fill_and_a_fill_gets_the_format_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    mw, renderer = _fim_middleware(monkeypatch, STARCODER_VOCAB)
    fill = json.loads(_run(mw, "/v1/completions", json.dumps({"model": "m", "prompt": "a", "suffix": "b"}).encode(),
                           renderer=renderer)["body"])
    assert renderer.render_completion_suffix("a", "b") == "<fim_prefix>a<fim_suffix>b<fim_middle>"
    assert fill["stop_token_ids"] == [0, 1, 3, 2, 4] and "stop" not in fill  # the chat format's stop strings: no
    plain = json.loads(_run(mw, "/v1/completions", json.dumps({"model": "m", "prompt": "a"}).encode(),
                            renderer=renderer)["body"])
    assert plain["stop_token_ids"] == [0] and plain["stop"] == ["Answer:"]


def test_no_hook_when_the_tokenizer_lacks_a_marker(monkeypatch: pytest.MonkeyPatch) -> None:
    mw, renderer = _fim_middleware(monkeypatch, {"<|endoftext|>": 0, "<fim_prefix>": 1})
    _run(mw, "/v1/completions", json.dumps({"model": "m", "prompt": "a", "suffix": "b"}).encode(), renderer=renderer)
    assert not hasattr(renderer, "render_completion_suffix")  # vLLM then refuses the suffix itself


def test_vllm_still_calls_the_hook_the_middleware_sets() -> None:
    """The pinned vLLM's extension point: the base renderer's method, called by the online renderer."""
    from vllm.renderers import online_renderer
    from vllm.renderers.base import BaseRenderer

    assert inspect.signature(BaseRenderer.render_completion_suffix).parameters.keys() == {"self", "prompt", "suffix"}
    source = inspect.getsource(online_renderer)
    assert "self.renderer.render_completion_suffix(" in source and '"Echo is unsupported with suffix."' in source


def test_the_hook_is_set_by_the_first_request_of_any_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    """A health probe comes first; with cache_aware the router's first call is a render endpoint,
    which passes by untouched but must already find the hook."""
    mw, renderer = _fim_middleware(monkeypatch, STARCODER_VOCAB)
    _run(mw, "/health", b"", renderer=renderer)
    assert renderer.render_completion_suffix("a", "b") == "<fim_prefix>a<fim_suffix>b<fim_middle>"
