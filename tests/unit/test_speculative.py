"""The manifest's ``speculative:``: checked as vLLM 0.32 checks it, planned, rendered to
``--speculative-config`` the same way for the local runner, Ray and the chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from codefleet.engine import engine_command
from codefleet.errors import ManifestError
from codefleet.manifest import parse
from codefleet.planner import plan_fleet
from codefleet.plans import ReplicaPlan
from codefleet.speculative import Speculative
from codefleet.tune import choose, parse_candidate
from tests.unit.test_engine_argv import vllm_parse

CODEFUSE = "codefuse-ai/CodeFuse-CodeLlama-34B"
NGRAM = "{method: ngram, num_speculative_tokens: 4, prompt_lookup_min: 2, prompt_lookup_max: 4}"


def _manifest(model_extra: str = "", defaults: str = "", gpu: str = "h100-80gb") -> str:
    return (f"defaults:\n  gpu: {gpu}\n{defaults}"
            f"models:\n  - name: cf\n    source: {CODEFUSE}\n{model_extra}")


def _plan(tmp_path: Path, text: str) -> ReplicaPlan:
    return plan_fleet(parse(text, tmp_path / "m.yaml")).models[0]


def _error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ManifestError) as exc:
        plan_fleet(parse(text, tmp_path / "m.yaml"))
    return str(exc.value)


def test_ngram_reaches_vllm_as_one_json_argument(tmp_path: Path) -> None:
    plan = _plan(tmp_path, _manifest(f"    speculative: {NGRAM}\n"))
    assert plan.speculative == {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2,
                                "prompt_lookup_max": 4}
    argv = engine_command(plan, host="h", port=1).argv
    assert argv.count("--speculative-config") == 1
    assert vllm_parse(argv[3:])["speculative_config"] == plan.speculative


def test_defaults_apply_and_a_model_can_turn_them_off(tmp_path: Path) -> None:
    text = (f"defaults:\n  gpu: h100-80gb\n  speculative: {{method: suffix}}\n"
            f"models:\n  - name: a\n    source: {CODEFUSE}\n  - name: b\n    source: {CODEFUSE}\n    speculative: off\n"
            f"  - name: c\n    source: {CODEFUSE}\n    speculative: {{method: off}}\n")
    a, b, c = plan_fleet(parse(text, tmp_path / "m.yaml")).models
    # vLLM's suffix defaults, spelled out (vllm/config/speculative.py); k defaults to the tree depth
    assert a.speculative == {"method": "suffix", "num_speculative_tokens": 24, "suffix_decoding_max_tree_depth": 24,
                             "suffix_decoding_max_cached_requests": 10000, "suffix_decoding_max_spec_factor": 1.0,
                             "suffix_decoding_min_token_prob": 0.1}
    assert b.speculative is None and c.speculative is None
    assert "--speculative-config" not in engine_command(b, host="h", port=1).argv


def test_unset_is_off(tmp_path: Path) -> None:
    plan = _plan(tmp_path, _manifest())
    assert plan.speculative is None
    assert "--speculative-config" not in engine_command(plan, host="h", port=1).argv


@pytest.mark.parametrize(("spec", "message"), [
    ("{method: ngram}", "num_speculative_tokens must be provided with method ngram"),
    ("{method: ngram, num_speculative_tokens: 0}", "greater than 0"),
    ("{method: ngram, num_speculative_tokens: 4, prompt_lookup_min: 5, prompt_lookup_max: 3}",
     "prompt_lookup_min=5 must be <= prompt_lookup_max=3"),
    ("{method: ngram, num_speculative_tokens: 4, prompt_lookup_max: 0}", "greater than or equal to 1"),
    ("{method: suffix, suffix_decoding_min_token_prob: 2}", "less than or equal to 1"),
    ("{method: suffix, prompt_lookup_max: 3}", "prompt_lookup_max is not a key of method suffix"),
    ("{method: ngram, num_speculative_tokens: 4, suffix_decoding_max_tree_depth: 8}",
     "suffix_decoding_max_tree_depth is not a key of method ngram"),
    ("{method: eagle}", "'off', 'ngram' or 'suffix'"),
    ("{method: ngram, num_speculative_tokens: 4, num_lookahead: 2}", "unknown key 'num_lookahead'"),
    ("{method: off, num_speculative_tokens: 4}", "method off takes no other keys"),
])
def test_refused_with_the_field_and_line(tmp_path: Path, spec: str, message: str) -> None:
    err = _error(tmp_path, _manifest(f"    speculative: {spec}\n"))
    assert message in err, err
    assert "models[0].speculative" in err and ":6" in err, err


def test_refused_in_defaults_names_defaults(tmp_path: Path) -> None:
    err = _error(tmp_path, _manifest(defaults="  speculative: {method: ngram}\n"))
    assert "defaults.speculative" in err and "must be provided" in err, err


@pytest.mark.parametrize("flag", ["speculative_config", "speculative-config", "spec_tokens", "spec_method",
                                  "speculative", "speculative_conf", "speculative_config.method"])
# vLLM's parser takes an abbreviation (--speculative for --speculative-config) and dotted keys
def test_engine_args_cannot_set_it_behind_the_fields_back(tmp_path: Path, flag: str) -> None:
    err = _error(tmp_path, _manifest(f"    engine_args: {{{flag}: {{}}}}\n"))
    assert "decided by codefleet" in err and "'speculative'" in err, err


def test_what_vllm_would_refuse_at_start_is_refused_first(tmp_path: Path) -> None:
    err = _error(tmp_path, _manifest(f"    speculative: {NGRAM}\n    engine_args: {{async_scheduling: true}}\n"))
    assert "async scheduling" in err and "models[0].speculative" in err, err
    lora = "    max_loras: 1\n    max_lora_rank: 16\n    engine_args: {max_num_seqs: 256, max_num_batched_tokens: 2048}\n"
    err = _error(tmp_path, _manifest("    speculative: {method: ngram, num_speculative_tokens: 8}\n" + lora))
    assert "max_num_seqs x (1 + num_speculative_tokens) = 2304" in err, err


def test_min_p_in_the_checkpoints_generation_config_is_refused(tmp_path: Path) -> None:
    """vLLM applies generation_config.json's defaults and refuses min_p with speculation."""
    from codefleet import demo_models

    model = tmp_path / "model"
    model.mkdir()
    src = demo_models.ensure("granite-code")
    (model / "config.json").write_text((src / "config.json").read_text())
    (model / "generation_config.json").write_text('{"min_p": 0.05}')
    text = f"defaults: {{gpu: cpu}}\nmodels:\n  - name: m\n    source: {model}\n    family: granite-code\n"
    assert _plan(tmp_path, text).speculative is None
    err = _error(tmp_path, text + f"    speculative: {NGRAM}\n")
    assert "min_p 0.05" in err and "generation_config.json" in err, err


def test_plan_shows_what_it_takes(tmp_path: Path) -> None:
    plan = _plan(tmp_path, _manifest(f"    speculative: {NGRAM}\n    max_model_len: 16384\n"))
    terms = {t.name: t for t in plan.budget}
    assert terms["speculative"].value == 4 and "no extra KV pool" in terms["speculative"].how
    seqs = plan.engine.max_num_seqs
    assert seqs is not None and terms["tokens per decode step"].value == seqs * 5
    assert terms["ngram warm-up (host)"].value == 1024 * 16384 * 4
    off = _plan(tmp_path, _manifest("    max_model_len: 16384\n"))
    # the KV budget is the same: ngram and suffix reserve no lookahead slots
    assert off.memory.kv_tokens == plan.memory.kv_tokens


def test_a_step_budget_too_small_for_full_drafts_is_said(tmp_path: Path) -> None:
    plan = _plan(tmp_path, _manifest("    speculative: {method: suffix, num_speculative_tokens: 32}\n"
                                     "    engine_args: {max_num_seqs: 256, max_num_batched_tokens: 4096}\n"))
    assert any("above max_num_batched_tokens 4,096" in w for w in plan.warnings), plan.warnings


def test_cpu_plan_speculates_too(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "defaults: {gpu: cpu}\nmodels:\n  - name: t\n    source: demo://smollm2-135m-instruct\n"
                           f"    speculative: {NGRAM}\n")
    terms = {t.name: t.value for t in plan.budget}
    assert terms["tokens per decode step"] == 128 * 5  # vLLM's CPU default max_num_seqs
    assert vllm_parse(engine_command(plan, host="127.0.0.1", port=1).argv[3:])["speculative_config"]["method"] == "ngram"


def test_the_ray_actor_starts_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Ray replica actor's own constructor (Ray's wrapper taken off), with the process start
    caught: the engine it would run gets the same --speculative-config."""
    import ray

    from codefleet.runtime import ray as ray_runtime

    started: list[list[str]] = []

    class Proc:
        pid = 123

        def wait(self) -> int:
            return 0

    class Ctx:
        def get_node_id(self) -> str:
            return "n" * 20

    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    monkeypatch.setattr(ray, "get_runtime_context", lambda: Ctx())
    monkeypatch.setattr(ray_runtime, "spawn", lambda argv, env, log: started.append(argv) or Proc())
    monkeypatch.setattr(ray_runtime.threading, "Thread", lambda **kw: type("T", (), {"start": lambda self: None})())
    plan = _plan(tmp_path, _manifest(f"    speculative: {NGRAM}\n"))
    ray_runtime.EngineReplica.__ray_actor_class__(plan, 0, {}, str(tmp_path), False)
    (argv,) = started
    assert json.loads(argv[argv.index("--speculative-config") + 1]) == plan.speculative
    assert vllm_parse(argv[3:])["speculative_config"] == plan.speculative


def test_vllm_agrees_on_what_it_accepts_and_fills_in() -> None:
    """The same dicts through vLLM's own SpeculativeConfig (the installed 0.32): what codefleet
    accepts vLLM accepts with the same values filled in, and what vLLM refuses codefleet refuses."""
    from codefleet import demo_models

    model_dir = demo_models.ensure("granite-code")
    from vllm.config import ParallelConfig
    from vllm.engine.arg_utils import EngineArgs

    target = EngineArgs(model=str(model_dir), max_model_len=1024).create_model_config()
    cases: list[dict[str, Any]] = [
        {"method": "ngram", "num_speculative_tokens": 4},
        {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 3},
        {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2},
        {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 5, "prompt_lookup_max": 3},
        {"method": "ngram"},
        {"method": "suffix"},
        {"method": "suffix", "num_speculative_tokens": 8, "suffix_decoding_max_spec_factor": 2.0},
        {"method": "suffix", "suffix_decoding_min_token_prob": 1.5},
        {"method": "suffix", "suffix_decoding_max_tree_depth": 0},
        {"method": "ngram", "num_speculative_tokens": 4, "bogus": 1},
    ]
    for case in cases:
        try:
            ours: dict[str, Any] | None = Speculative(**case).vllm_config()
        except ValueError:
            ours = None
        try:
            theirs = EngineArgs(model=str(model_dir), speculative_config=dict(case)).create_speculative_config(
                target_model_config=target, target_parallel_config=ParallelConfig())
        except (ValueError, TypeError):
            theirs = None
        assert (ours is None) == (theirs is None), (case, ours, theirs)
        if ours is not None and theirs is not None:
            assert {k: getattr(theirs, k) for k in ours} == ours, case


def test_candidates_parse_like_the_manifest() -> None:
    assert parse_candidate("off").on is False
    assert parse_candidate("ngram:4:2:4").vllm_config() == {"method": "ngram", "num_speculative_tokens": 4,
                                                             "prompt_lookup_min": 2, "prompt_lookup_max": 4}
    assert parse_candidate("suffix:16").tokens == 16
    for bad in ("ngram", "ngram:x", "suffix:1:2", "eagle:3", "ngram:4:5:3"):
        with pytest.raises(ValueError):
            parse_candidate(bad)


def _cell(candidate: str, workload: str, c: int, tps: float) -> dict[str, Any]:
    spec = None if candidate == "off" else {"method": candidate}
    return {"candidate": candidate, "speculative": spec, "workload": workload, "concurrency": c,
            "output_tokens_per_s": tps, "ok": 8}


def test_the_winner_is_measured_and_never_loses_a_cell_by_much() -> None:
    cells = [_cell("off", "edits", 1, 30), _cell("off", "chat", 1, 30),
             _cell("ngram", "edits", 1, 80), _cell("ngram", "chat", 1, 29),      # 2.67x, 0.97x
             _cell("suffix", "edits", 1, 120), _cell("suffix", "chat", 1, 20)]   # 4x, but chat 0.67x
    best = choose(cells)
    assert best["candidate"] == "ngram" and best["worst"] == pytest.approx(29 / 30)
    assert best["scores"]["suffix"]["worst"] == pytest.approx(20 / 30)
    assert choose(cells, max_slowdown=0.5)["candidate"] == "suffix"
    slower = [_cell("off", "chat", 1, 30), _cell("ngram", "chat", 1, 25)]
    assert choose(slower)["candidate"] == "off"
    with pytest.raises(ValueError, match="baseline"):
        choose([_cell("ngram", "chat", 1, 25)])


def test_apply_replaces_the_replicas_when_it_changes(tmp_path: Path) -> None:
    """`codefleet apply` rolls a changed setting out: it is part of the engine's generation."""
    from codefleet.runtime.replica import generation

    off = _plan(tmp_path, _manifest())
    on = _plan(tmp_path, _manifest(f"    speculative: {NGRAM}\n"))
    other = _plan(tmp_path, _manifest("    speculative: {method: ngram, num_speculative_tokens: 8}\n"))
    assert len({generation(off), generation(on), generation(other)}) == 3
    assert generation(on) == generation(_plan(tmp_path, _manifest(f"    speculative: {NGRAM}\n")))
