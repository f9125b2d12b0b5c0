"""LoRA adapters: the manifest's checks, the planner's LoRA slots, what reaches vLLM, the router
aliases, the project's own adapters as vLLM reads them, and the launcher's load-then-route sync
(against a fake engine: the real ones are in tests/runtime/test_lora.py)."""

from __future__ import annotations

import json
import socket
import urllib.parse
from pathlib import Path
from typing import Any

import httpx
import pytest

from codefleet.engine import engine_command, engine_spec, flags_argv
from codefleet.errors import ManifestError, PlanError
from codefleet.lora import RUNTIME_ENV, alias_url, lora_slot_bytes
from codefleet.manifest import parse
from codefleet.planner import plan_fleet
from codefleet.plans import FleetPlan
from codefleet.runtime.adapters import ReplicaAdapters, sync
from codefleet.runtime.changes import adapter_changes
from codefleet.runtime.replica import generation
from tests.unit.test_engine_argv import vllm_parse

CODEFUSE = "codefuse-ai/CodeFuse-CodeLlama-34B"


def write_adapter(folder: Path, r: int = 8, base: str = CODEFUSE, **extra: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": 16, "target_modules": ["q_proj"], "bias": "none",
         "base_model_name_or_path": base, **extra}))
    (folder / "adapter_model.safetensors").write_bytes(b"")
    return folder


def manifest(model_extra: str, gpu: str = "h100-80gb", source: str = CODEFUSE, more: str = "") -> str:
    return f"defaults:\n  gpu: {gpu}\nmodels:\n  - name: cf\n    source: {source}\n{model_extra}{more}"


def plan(tmp_path: Path, text: str) -> FleetPlan:
    return plan_fleet(parse(text, tmp_path / "m.yaml"))


def error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ManifestError) as exc:
        plan(tmp_path, text)
    return str(exc.value)


def test_adapters_reach_vllm_through_the_one_mapping(tmp_path: Path) -> None:
    write_adapter(tmp_path / "a", r=16)
    p = plan(tmp_path, manifest("    adapters: [{name: cf-team, source: ./a}]\n")).models[0]
    assert p.lora is not None and (p.lora.max_loras, p.lora.max_lora_rank) == (1, 16)
    cmd = engine_command(p, host="127.0.0.1", port=9001)
    parsed = vllm_parse(cmd.argv[3:])
    assert (parsed["enable_lora"], parsed["max_loras"], parsed["max_lora_rank"]) == (True, 1, 16)
    assert cmd.env[RUNTIME_ENV] == "1", "local and Ray engines load adapters at run time"
    # the chart's engines load them at start instead
    spec = engine_spec(p, loopback=False, adapter_paths={"cf-team": "/var/lib/codefleet/adapters/cf-team"})
    assert RUNTIME_ENV not in spec.env
    modules = vllm_parse([*cmd.argv[3:5], *flags_argv(spec.flags)])["lora_modules"]
    assert [(m.name, m.path) for m in modules] == [("cf-team", "/var/lib/codefleet/adapters/cf-team")]


def test_defaults_come_from_the_adapters(tmp_path: Path) -> None:
    write_adapter(tmp_path / "a", r=4)
    write_adapter(tmp_path / "b", r=24)
    p = plan(tmp_path, manifest("    adapters: [{name: x, source: ./a}, {name: y, source: ./b}]\n")).models[0]
    assert p.lora is not None and (p.lora.max_loras, p.lora.max_lora_rank) == (2, 32)  # vLLM's ranks: 24 -> 32
    assert plan(tmp_path, manifest("    max_loras: 3\n")).models[0].lora is not None, "LoRA on with no adapter yet"
    assert plan(tmp_path, manifest("")).models[0].lora is None


@pytest.mark.parametrize(("extra", "message"), [
    ("    adapters: [{name: cf, source: ./a}]\n", "is the served name of models[0]"),
    ("    adapters: [{name: x, source: ./a}, {name: x, source: ./a}]\n", "already used in models[0]"),
    ("    adapters: [{name: x, source: ./missing}]\n", "has no adapter_config.json"),
    ("    adapters: [{name: x, source: ./other}]\n", "was made for 'someone/else'"),
    ("    adapters: [{name: x, source: ./a}]\n    max_lora_rank: 1\n", "above max_lora_rank 1"),
    ("    adapters: [{name: x, source: org/adapter}]\n", "set max_lora_rank"),
    ("    max_lora_rank: 12\n", "max_lora_rank"),
    ("    adapters: [{name: x, source: ./dora}]\n", "DoRA"),
    ("    engine_args: {enable_lora: true}\n", "decided by codefleet"),
    ("    engine_args: {lora_modules: x=/y}\n", "decided by codefleet"),
])
def test_refused_with_the_field_and_line(tmp_path: Path, extra: str, message: str) -> None:
    write_adapter(tmp_path / "a")
    write_adapter(tmp_path / "other", base="someone/else")
    write_adapter(tmp_path / "dora", use_dora=True)
    err = error(tmp_path, manifest(extra))
    assert message in err and "m.yaml:" in err, err


def test_architectures_vllm_cannot_serve_with_lora_are_refused(tmp_path: Path) -> None:
    err = error(tmp_path, manifest("    adapters: [{name: x, source: \"demo-lora://1\"}]\n", gpu="cpu",
                                   source="demo://chatml"))
    assert "StableLM has no LoRA support" in err and "models[0].adapters" in err, err
    err = error(tmp_path, manifest("    max_loras: 1\n", gpu="cpu", source="demo://granite"))
    assert "Triton fused-MoE kernel" in err, err
    moe = "ibm-granite/granite-3.0-1b-a400m-instruct"
    assert plan(tmp_path, manifest("    max_loras: 1\n    max_lora_rank: 8\n", source=moe)).models[0].lora


def test_names_are_unique_across_the_fleet_and_tenants_may_name_adapters(tmp_path: Path) -> None:
    write_adapter(tmp_path / "a")
    two = ("  - name: other\n    source: ibm-granite/granite-3b-code-instruct-128k\n"
           "    adapters: [{name: shared, source: ./g}]\n")
    write_adapter(tmp_path / "g", base="ibm-granite/granite-3b-code-instruct-128k")
    err = error(tmp_path, manifest("    adapters: [{name: shared, source: ./a}]\n", more=two))
    assert "models[1].adapters[0].name: adapter name 'shared' is already used in models[0]" in err, err
    text = ("router: {api_keys: {env: K}}\ntenants:\n  t: {models: [shared]}\n"
            + manifest("    adapters: [{name: shared, source: ./a}]\n"))
    assert plan(tmp_path, text).tenants["t"].models == ["shared"]


def test_lora_slots_come_out_of_the_kv_cache_on_a_gpu(tmp_path: Path) -> None:
    from codefleet.catalog import lookup

    lora = "    max_loras: 4\n    max_lora_rank: 64\n"
    # 34B in bf16 leaves an 80 GB GPU about 2 GiB of KV room; four rank-64 slots (3.3 GiB) do not fit
    # beside it, so the planner takes the next tensor-parallel size
    assert plan(tmp_path, manifest("")).models[0].placement.tensor_parallel_size == 1
    assert plan(tmp_path, manifest(lora)).models[0].placement.tensor_parallel_size == 2
    with pytest.raises(PlanError) as exc:
        plan(tmp_path, manifest(lora + "    tensor_parallel_size: 1\n"))
    assert "3.3 GiB of LoRA slots (max_loras 4 x max_lora_rank 64); " in str(exc.value), exc.value
    assert "use tensor_parallel_size 2" in str(exc.value)
    without = plan(tmp_path, manifest("    tensor_parallel_size: 2\n")).models[0]
    with_lora = plan(tmp_path, manifest(lora + "    tensor_parallel_size: 2\n")).models[0]
    entry = lookup(CODEFUSE)
    assert entry is not None
    slots = 4 * lora_slot_bytes(entry.shape, 64, 2, 2)
    assert without.memory.kv_bytes_per_gpu - with_lora.memory.kv_bytes_per_gpu == slots
    assert any(t.name == "LoRA slots" and t.value == slots for t in with_lora.budget)


def test_slot_bytes_are_the_adapter_tensors_at_full_rank(tmp_path: Path) -> None:
    """The linear layers' part, independent of the formula's arithmetic: a slot holds, per layer,
    exactly the A and B of an adapter of rank max_lora_rank on every linear module (qkv's three
    slices have q, k and v's shapes). The embed_tokens and lm_head term is the formula's own."""
    from safetensors import safe_open

    from codefleet import demo_models, lora_build
    from codefleet.shapes import ModelShape

    model_dir = demo_models.ensure("granite-code")
    folder = lora_build.ensure(tmp_path, model_dir, 5, "demo")
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        numel = sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] for k in f.keys())
    config = json.loads((model_dir / "config.json").read_text())
    shape = ModelShape.from_hf_config(config)
    embeddings = 2 * (shape.vocab_size + shape.hidden_size) * lora_build.RANK
    assert lora_slot_bytes(shape, lora_build.RANK, 4) == (numel + embeddings) * 4


def test_the_projects_adapters_are_deterministic_and_vllm_reads_them(tmp_path: Path) -> None:
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper

    from codefleet import demo_models, lora_build

    model_dir = demo_models.ensure("granite-code")
    a = lora_build.ensure(tmp_path / "one", model_dir, 1, "demo")
    b = lora_build.ensure(tmp_path / "two", model_dir, 1, "demo")
    c = lora_build.ensure(tmp_path / "one", model_dir, 2, "demo")
    assert (a / "adapter_model.safetensors").read_bytes() == (b / "adapter_model.safetensors").read_bytes()
    assert (a / "adapter_model.safetensors").read_bytes() != (c / "adapter_model.safetensors").read_bytes()
    helper = PEFTHelper.from_local_dir(str(a), max_position_embeddings=4096)
    helper.validate_legal(LoRAConfig(max_lora_rank=8, max_loras=1))
    assert helper.r == lora_build.RANK


def test_aliases_name_the_same_address_and_differ_from_each_other() -> None:
    url = "http://127.0.0.1:8001"
    aliases = [alias_url(url, n) for n in (1, 2, 3)]
    assert aliases == ["http://127.0.0.01:8001", "http://127.0.0.001:8001", "http://127.0.0.0001:8001"]
    assert {socket.inet_aton(urllib.parse.urlsplit(a).hostname or "") for a in aliases} == {socket.inet_aton("127.0.0.1")}
    assert alias_url("http://10.1.2.8:80", 1) == "http://10.1.2.010:80"  # octal: 010 is 8
    assert alias_url("http://10.1.2.0:80", 2) == "http://10.1.2.000:80"
    assert socket.inet_aton("127.0.0.001") == socket.inet_aton("127.0.0.1")
    with pytest.raises(ValueError, match="IPv4"):
        alias_url("http://[::1]:8001", 1)
    with pytest.raises(ValueError, match="IPv4"):
        alias_url("http://engine.svc:8001", 1)


class FakeEngine:
    """vLLM's runtime LoRA endpoints and /v1/models as 0.32 answers them
    (vllm/entrypoints/openai/models/serving.py)."""

    def __init__(self) -> None:
        self.loaded: dict[str, str] = {}
        self.fail: set[str] = set()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json={"data": [{"id": n, "root": p, "parent": "m"} for n, p in self.loaded.items()]})
        body = json.loads(request.content)
        name = body["lora_name"]
        if request.url.path == "/v1/load_lora_adapter":
            if name in self.fail:
                return httpx.Response(404, json={"error": {"message": f"Loading lora {name} failed"}})
            if name in self.loaded:
                return httpx.Response(400, json={"error": {"message": f"The lora adapter '{name}' has already "
                                                                      "been loaded."}})
            self.loaded[name] = body["lora_path"]
            return httpx.Response(200, text=f"Success: LoRA adapter '{name}' added successfully.")
        if name not in self.loaded:
            return httpx.Response(404, json={"error": {"message": "cannot be found"}})
        del self.loaded[name]
        return httpx.Response(200, text="Success")


def test_sync_loads_before_it_routes_and_unroutes_before_it_unloads() -> None:
    engine = FakeEngine()
    events: list[str] = []
    client = httpx.Client(transport=httpx.MockTransport(lambda r: (events.append("engine " + r.url.path), engine(r))[1]))
    have = ReplicaAdapters()
    url = "http://127.0.0.1:9000"
    alive = [True]

    def run(want: dict[str, str], now: float = 0.0) -> bool:
        return sync(client, url, have, want, {}, lambda alias, name: events.append(f"add {name} {alias}"),
                    lambda alias, name: events.append(f"remove {alias}"), lambda _: None, "r0", now,
                    still=lambda: alive[0], quiet_s=0)

    assert run({"a": "/a", "b": "/b"})
    assert events == ["engine /v1/load_lora_adapter", f"add a {alias_url(url, 1)}",
                      "engine /v1/load_lora_adapter", f"add b {alias_url(url, 2)}"]
    assert not run({"a": "/a", "b": "/b"}), "nothing to do the second time"
    events.clear()
    assert run({"b": "/b"})
    assert events == [f"remove {alias_url(url, 1)}", "engine /v1/unload_lora_adapter"]
    # a lost registration (router restart): loading again is vLLM's 400, taken as loaded when the
    # engine's card says it came from the same folder
    have.loaded.clear()
    assert run({"b": "/b"}) and set(have.loaded) == {"b"} and engine.loaded == {"b": "/b"}
    # ... and unloaded and loaded again when it came from another one
    have.loaded.clear()
    assert run({"b": "/b2"}) and engine.loaded == {"b": "/b2"} and have.loaded["b"].path == "/b2"
    # a failed load is not routed, and is tried again only after RETRY_S
    engine.fail.add("c")
    events.clear()
    assert not run({"b": "/b2", "c": "/c"}, now=100.0)
    assert "c" in have.failed and not any(e.startswith("add c") for e in events)
    engine.fail.clear()
    assert not run({"b": "/b2", "c": "/c"}, now=101.0)
    assert run({"b": "/b2", "c": "/c"}, now=111.0) and "c" in have.loaded and not have.failed
    # the replica left (deregistered, restarted) while its engine loaded: nothing is routed
    alive[0] = False
    events.clear()
    assert not run({"b": "/b2", "c": "/c", "d": "/d"}) and not any(e.startswith("add") for e in events)


def test_an_engine_address_with_no_alias_is_a_failed_adapter_not_a_crash() -> None:
    engine = FakeEngine()
    client = httpx.Client(transport=httpx.MockTransport(engine))
    have = ReplicaAdapters()
    assert not sync(client, "http://[::1]:9000", have, {"a": "/a"}, {}, lambda *_: None, lambda *_: None,
                    lambda _: None, "r0", 0.0, quiet_s=0)
    assert "IPv4" in have.failed["a"][1] and not have.loaded


def test_adapters_are_not_part_of_the_generation_but_the_slots_are(tmp_path: Path) -> None:
    write_adapter(tmp_path / "a")
    write_adapter(tmp_path / "b")
    one = plan(tmp_path, manifest("    adapters: [{name: x, source: ./a}]\n    max_loras: 2\n"))
    two = plan(tmp_path, manifest("    adapters: [{name: x, source: ./a}, {name: y, source: ./b}]\n    max_loras: 2\n"))
    more = plan(tmp_path, manifest("    adapters: [{name: x, source: ./a}]\n    max_loras: 3\n"))
    assert generation(one.models[0]) == generation(two.models[0]) != generation(more.models[0])
    assert adapter_changes(one, two) == ["cf: adapters +y (live, on every replica)"]
    assert adapter_changes(two, one) == ["cf: adapters -y (live, on every replica)"]


def test_the_ray_actor_starts_its_engine_with_runtime_adapters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Ray replica actor's own constructor (process start caught): the same LoRA flags, and the
    runtime loading the launcher's adapter sync needs (Ray replicas are synced like local ones)."""
    import ray

    from codefleet.runtime import ray as ray_runtime

    started: list[tuple[list[str], dict[str, str]]] = []

    class Proc:
        pid = 123

        def wait(self) -> int:
            return 0

    class Ctx:
        def get_node_id(self) -> str:
            return "n" * 20

    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    monkeypatch.setattr(ray, "get_runtime_context", lambda: Ctx())
    monkeypatch.setattr(ray_runtime, "spawn", lambda argv, env, log: started.append((argv, env)) or Proc())
    monkeypatch.setattr(ray_runtime.threading, "Thread", lambda **kw: type("T", (), {"start": lambda self: None})())
    write_adapter(tmp_path / "a")
    p = plan(tmp_path, manifest("    adapters: [{name: x, source: ./a}]\n")).models[0]
    ray_runtime.EngineReplica.__ray_actor_class__(p, 0, {}, str(tmp_path), False)
    ((argv, env),) = started
    parsed = vllm_parse(argv[3:])
    assert (parsed["enable_lora"], parsed["max_loras"], parsed["max_lora_rank"]) == (True, 1, 8)
    assert env[RUNTIME_ENV] == "1"


def test_an_autoscaled_models_adapters_are_held_like_it_and_wake_it(tmp_path: Path) -> None:
    """Scale from zero: a request for an adapter of a model at zero replicas is held (the model's
    hold), and counts as demand for the model (the local autoscaler and the chart's KEDA query)."""
    from codefleet.frontend_config import frontend_settings
    from codefleet.helm import _autoscaling_values

    write_adapter(tmp_path / "a")
    p = plan(tmp_path, manifest("    adapters: [{name: cf-a.x, source: ./a}]\n"
                                "    autoscaling: {min_replicas: 0, max_replicas: 2}\n"))
    hold = frontend_settings(p).hold
    assert hold["cf-a.x"] == hold["cf"]
    # and it fills in the middle as its model does (codefuse does not; the granite-code model does)
    assert "cf-a.x" not in frontend_settings(p).fim
    write_adapter(tmp_path / "g", base="ibm-granite/granite-3b-code-instruct-128k")
    g = plan(tmp_path, manifest("    adapters: [{name: g-a, source: ./g}]\n",
                                source="ibm-granite/granite-3b-code-instruct-128k"))
    assert frontend_settings(g).fim == {"cf": "starcoder", "g-a": "starcoder"}
    query = _autoscaling_values(p.models[0])["heldQuery"]
    assert query == 'sum(codefleet_gateway_held_requests{model=~"cf|cf\\\\-a\\\\.x"}) or vector(0)', query


def test_a_reload_holds_a_new_adapter_and_answers_the_requests_of_a_removed_one() -> None:
    from codefleet.gateway.config import Hold
    from codefleet.gateway.hold import Holding
    from codefleet.gateway.metrics import GatewayMetrics

    class Waiting:
        hold_timer = None
        rejected: list[int] = []

        def reject(self, rej: Any) -> None:
            self.rejected.append(rej.status)

    h = Hold(8, 60.0)
    holding = Holding({"m": h, "m-a": h}, GatewayMetrics({"m": h, "m-a": h}), lambda: None)
    waiting = Waiting()
    holding.held["m-a"].append(waiting)  # type: ignore[arg-type]
    holding.configure({"m": h, "m-b": h})
    assert holding.holds("m-b") and not holding.holds("m-a") and "m-b" in holding.held
    assert Waiting.rejected == [503] and "m-a" not in holding.held
