from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from codefleet.catalog import CATALOG
from codefleet.errors import PlanError
from codefleet.manifest import parse
from codefleet.planner import plan_fleet
from codefleet.shapes import ModelShape
from codefleet.sizing import GiB, kv_bytes_per_token, parameter_count

GRANITE_CODE = "ibm-granite/granite-3b-code-instruct-128k"
GRANITE_MOE = "ibm-granite/granite-3.0-1b-a400m-instruct"
STABLE = "stabilityai/stable-code-instruct-3b"
STARCODER = "GeorgiaTechResearchInstitute/starcoder-gpteacher-code-instruct"
CODEFUSE = "codefuse-ai/CodeFuse-CodeLlama-34B"
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the demo fleet\'s trained model

# Parameters counted by hand from each config.json (see sizing.parameter_count's terms).
PARAMETERS = {
    GRANITE_CODE: 3_482_503_680,
    GRANITE_MOE: 1_334_628_352,
    STABLE: 2_795_443_200,
    STARCODER: 15_517_456_384,
    CODEFUSE: 33_743_970_304,
}

# KV bytes per token per GPU at 16 bit: 2 * layers * kv heads per rank * head_dim * 2.
KV_16BIT = {
    GRANITE_CODE: {1: 327_680, 2: 163_840, 4: 81_920},  # 32 layers, 32 KV heads, 80
    GRANITE_MOE: {1: 49_152, 2: 24_576, 4: 12_288},  # 24 layers, 8 KV heads, 64
    STABLE: {1: 327_680, 2: 163_840, 4: 81_920},  # 32 layers, 32 KV heads, 80
    STARCODER: {1: 20_480, 2: 20_480, 4: 20_480},  # 40 layers, 1 KV head (replicated), 128
    CODEFUSE: {1: 196_608, 2: 98_304, 4: 49_152},  # 48 layers, 8 KV heads, 128
}


@pytest.mark.parametrize("hf_id", list(PARAMETERS))
def test_parameters_and_weight_bytes(hf_id: str) -> None:
    shape = CATALOG[hf_id].shape
    assert parameter_count(shape) == PARAMETERS[hf_id]


def test_codefuse_weights_match_the_issue_example() -> None:
    assert parameter_count(CATALOG[CODEFUSE].shape) * 2 / GiB == pytest.approx(62.85, abs=0.01)


@pytest.mark.parametrize("hf_id", list(KV_16BIT))
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_kv_bytes_per_token(hf_id: str, tp: int) -> None:
    assert kv_bytes_per_token(CATALOG[hf_id].shape, 2, tp) == KV_16BIT[hf_id][tp]


def test_multi_query_is_48x_smaller_than_full_attention() -> None:
    s = CATALOG[STARCODER].shape
    full = ModelShape(**{**s.__dict__, "num_kv_heads": s.num_heads})
    assert kv_bytes_per_token(full, 2) == 48 * kv_bytes_per_token(s, 2)


def test_granite_128k_sequence_takes_39_gib() -> None:
    assert 128000 * kv_bytes_per_token(CATALOG[GRANITE_CODE].shape, 2) / GiB == pytest.approx(39.06, abs=0.01)


def _tiny_hf_models() -> list[tuple[str, dict[str, object]]]:
    from codefleet.demo_models import DEMO_CONFIGS

    return [(f, dict(c)) for f, c in DEMO_CONFIGS.items()]


@pytest.mark.parametrize(("family", "config"), _tiny_hf_models(), ids=lambda v: v if isinstance(v, str) else "")
def test_parameter_count_equals_transformers(family: str, config: dict[str, object]) -> None:
    """The formula counts exactly what transformers instantiates, for every seed architecture."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = {**config, "vocab_size": 500}
    model_type = str(raw.pop("model_type"))
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **raw), torch_dtype=torch.float32)
    real = sum(p.numel() for p in hf.parameters())
    assert parameter_count(ModelShape.from_hf_config({**raw, "model_type": model_type})) == real


def _plan(tmp_path: Path, text: str, gpu: str | None = None):  # type: ignore[no-untyped-def]
    return plan_fleet(parse(text, tmp_path / "m.yaml"), gpu=gpu)


def _one(source: str, extra: str = "") -> str:
    return f"models:\n  - name: m\n    source: {source}\n{extra}"


# Smallest TP per GPU type at min_concurrent_sequences 1 with each model's full context.
TP_CHOICES = {
    "a100-40gb": {GRANITE_CODE: 2, GRANITE_MOE: 1, STABLE: 1, STARCODER: 1, CODEFUSE: 2, SMOLLM2: 1},
    "a100-80gb": {GRANITE_CODE: 1, GRANITE_MOE: 1, STABLE: 1, STARCODER: 1, CODEFUSE: 1, SMOLLM2: 1},
    "h100-80gb": {GRANITE_CODE: 1, GRANITE_MOE: 1, STABLE: 1, STARCODER: 1, CODEFUSE: 1, SMOLLM2: 1},
    "h200-141gb": {GRANITE_CODE: 1, GRANITE_MOE: 1, STABLE: 1, STARCODER: 1, CODEFUSE: 1, SMOLLM2: 1},
}


@pytest.mark.parametrize("gpu", list(TP_CHOICES))
@pytest.mark.parametrize("hf_id", list(CATALOG))
def test_tp_choice(tmp_path: Path, gpu: str, hf_id: str) -> None:
    plan = _plan(tmp_path, _one(hf_id), gpu=gpu)
    m = plan.models[0]
    assert m.placement.tensor_parallel_size == TP_CHOICES[gpu][hf_id]
    assert m.memory.kv_tokens >= m.engine.max_model_len
    assert m.placement.gpus_per_replica == m.placement.tensor_parallel_size
    assert m.estimate is not None and m.estimate.decode_tokens_per_s_batch1 > 0


def test_codefuse_on_a100_40gb_at_tp1_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(PlanError) as info:
        _plan(tmp_path, _one(CODEFUSE, "    tensor_parallel_size: 1\n    dtype: bfloat16\n"), gpu="a100-40gb")
    msg = str(info.value)
    assert "CodeFuse-CodeLlama-34B in bfloat16 needs 62.9 GiB of weights" in msg
    assert "one a100-40gb at 0.90 utilisation holds 35.5 GiB (of the 39.49 GiB CUDA reports)" in msg
    assert "use tensor_parallel_size 2" in msg
    assert "m.yaml:2" in msg


def test_more_sequences_need_more_gpus(tmp_path: Path) -> None:
    plan = _plan(tmp_path, _one(CODEFUSE, "    min_concurrent_sequences: 8\n"), gpu="a100-40gb")
    assert plan.models[0].placement.tensor_parallel_size == 4


def test_impossible_everywhere(tmp_path: Path) -> None:
    text = "defaults:\n  gpus_per_node: 1\n" + _one(GRANITE_CODE, "    min_concurrent_sequences: 4\n")
    with pytest.raises(PlanError, match="no tensor_parallel_size up to 1 fits"):
        _plan(tmp_path, text, gpu="a100-40gb")


def test_replicas_per_node_and_nodes(tmp_path: Path) -> None:
    plan = _plan(tmp_path, _one(CODEFUSE, "    min_concurrent_sequences: 8\n    replicas: 3\n"), gpu="a100-40gb")
    m = plan.models[0]
    assert (m.placement.replicas_per_node, m.placement.nodes) == (2, 2)
    assert plan.total_gpus == 12


def test_cpu_plan_kv_tokens(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "defaults: {gpu: cpu, cpu_kv_cache_gib: 1}\n" + _one("demo://codefuse",
                 "    tensor_parallel_size: 2\n"))
    m = plan.models[0]
    # 2 layers * (2 KV heads / 2 ranks) * 64 * 2 (K,V) * 4 bytes = 1024 bytes per token per rank.
    assert m.memory.kv_bytes_per_token_per_gpu == 1024
    assert m.memory.kv_tokens == GiB // 1024
    assert m.placement.gpus_per_replica == 0


def test_plan_json_is_nested_by_concern(tmp_path: Path) -> None:
    """``codefleet plan --json``: the plan's groups as objects, the chat template as a path string."""
    m = _plan(tmp_path, "defaults: {gpu: cpu, cpu_kv_cache_gib: 1}\n" + _one("demo://codefuse")).models[0]
    out = json.loads(json.dumps(m.to_json()))
    assert {"placement", "memory", "engine", "generation", "moe", "estimate", "budget"} <= set(out)
    assert out["placement"]["tensor_parallel_size"] == m.placement.tensor_parallel_size
    assert out["placement"]["gpus_per_replica"] == 0
    assert out["memory"]["kv_tokens"] == m.memory.kv_tokens
    assert out["engine"]["max_model_len"] == m.engine.max_model_len
    assert out["generation"]["chat_template"] == str(m.generation.chat_template)
    assert "kv_tokens" not in out and "replicas" not in out  # no flat copies


def test_autoscaled_model_starts_at_min_replicas_unless_replicas_is_set(tmp_path: Path) -> None:
    auto = "    autoscaling: {min_replicas: 0, max_replicas: 3, signal: ttft, target: 0.5}\n    ttft_slo_seconds: 4\n"
    p = _plan(tmp_path, _one(STABLE, auto)).models[0]
    assert (p.placement.replicas, p.max_replicas, p.placement.nodes) == (0, 3, 0)
    assert p.autoscale is not None and p.autoscale.target == 2.0  # 0.5 of the 4 s SLO
    p = _plan(tmp_path, _one(STABLE, "    replicas: 2\n" + auto)).models[0]
    assert p.placement.replicas == 2


def test_capacity_refuses_max_replicas_that_cannot_fit(tmp_path: Path) -> None:
    text = ("capacity: {a100-40gb: 8}\ndefaults: {gpu: a100-40gb}\nmodels:\n"
            f"  - name: code\n    source: {GRANITE_CODE}\n    autoscaling: {{max_replicas: 3}}\n"
            f"  - name: cf\n    source: {CODEFUSE}\n    autoscaling: {{min_replicas: 0, max_replicas: 2}}\n")
    with pytest.raises(PlanError) as e:
        _plan(tmp_path, text)
    msg = str(e.value)
    # granite-code is TP2 and CodeFuse TP2 on an A100-40GB: 3 x 2 + 2 x 2 = 10 > 8
    assert "m.yaml:1" in msg and "capacity.a100-40gb" in msg, msg
    assert "need 10 GPUs (code 3 x TP2 + cf 2 x TP2) but capacity is 8" in msg, msg
    assert "code fits at most 2 replica(s)" in msg, msg
    ok = text.replace("max_replicas: 3", "max_replicas: 2")
    assert _plan(tmp_path, ok).models[0].max_replicas == 2


def test_capacity_names_an_unknown_gpu_type(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="unknown GPU type 'h100-80'; did you mean 'h100-80gb'"):
        _plan(tmp_path, "capacity: {h100-80: 8}\n" + _one(STABLE))


# -- the plan's record of its arithmetic --------------------------------------------------------

def _fleet_plan(gpu: str) -> tuple[Any, Any]:
    from codefleet.manifest import load
    root = Path(__file__).resolve().parents[2]
    loaded = load(root / "deploy" / "manifests" / "fleet.yaml")
    return loaded, plan_fleet(loaded, gpu=gpu)


def test_budget_terms_are_the_plans_numbers() -> None:
    """Each number the plan reports is one of its recorded terms, and the terms add up."""
    _, plan = _fleet_plan("h100-80gb")
    for p in plan.models:
        t = {term.name: term.value for term in p.budget}
        assert t["weights"] == p.memory.weight_bytes and t["parameters"] == p.memory.parameters
        assert t["weights per GPU"] == p.memory.weight_bytes_per_gpu
        assert t["KV cache"] == p.memory.kv_bytes_per_gpu and t["KV tokens"] == p.memory.kv_tokens
        assert t["KV bytes per token"] == p.memory.kv_bytes_per_token_per_gpu
        assert t["fixed reserve"] + t["activations"] + t["sampler logits"] == p.memory.reserve_bytes_per_gpu
        assert t["budget"] - t["weights per GPU"] - p.memory.reserve_bytes_per_gpu == p.memory.kv_bytes_per_gpu
        assert t["TP choice"] == p.placement.tensor_parallel_size and t["host CPUs"] == p.placement.host_cpus
        assert t["full-length seqs"] == p.memory.full_length_sequences
        assert t["batch ceiling"] == p.estimate.max_batch
        assert all(term.how for term in p.budget)


def test_explain_shows_the_recorded_terms_and_computes_none() -> None:
    import dataclasses

    from codefleet.explain import explain
    from codefleet.plans import Term
    from codefleet.resolve import resolve

    loaded, plan = _fleet_plan("h100-80gb")
    r, p = resolve(loaded)[0], plan.models[0]
    text = explain(r, p)
    for term in p.budget:
        assert f"{term.name}" in text and term.shown in text and term.how in text
    # explain shows what the plan recorded: a changed record changes the output
    fake = dataclasses.replace(p, budget=(Term("KV cache", 12345 * GiB, "bytes", "recorded by the plan"),))
    assert "12,345.00 GiB  recorded by the plan" in explain(r, fake)
    assert "budget" not in explain(r, fake).split("\n", 2)[2]


@pytest.mark.parametrize(("gpu", "tp", "cpus"), [("h100-80gb", 1, 3), ("h100-80gb", 2, 4), ("cpu", 2, 2)])
def test_host_cpus_are_decided_by_the_plan(gpu: str, tp: int, cpus: int) -> None:
    from codefleet.sizing import host_cpus
    assert host_cpus(gpu, tp) == cpus


def test_ray_and_the_chart_reserve_the_plans_cpus() -> None:
    from codefleet.helm import helm_values
    from codefleet.runtime.ray import bundle

    loaded, plan = _fleet_plan("h100-80gb")
    values = {m["name"]: m for m in helm_values(loaded, plan)["models"]}
    tps = set()
    for p in plan.models:
        tps.add(p.placement.tensor_parallel_size)
        assert p.placement.host_cpus == 2 + p.placement.tensor_parallel_size
        assert bundle(p)["CPU"] == p.placement.host_cpus
        assert values[p.name]["resources"]["requests"]["cpu"] == str(p.placement.host_cpus)
    assert tps == {1, 2}
