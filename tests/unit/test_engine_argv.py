"""What reaches vLLM: the argv of one replica, parsed by vLLM's own argument parser."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from codefleet.engine import MIDDLEWARE, VLLM_MODULE, cpu_binding, engine_command, engine_spec, flags_argv
from codefleet.manifest import parse
from codefleet.planner import plan_fleet
from codefleet.plans import ReplicaPlan

CODEFUSE = "codefuse-ai/CodeFuse-CodeLlama-34B"


def _plan(tmp_path: Path, text: str, gpu: str | None = None) -> ReplicaPlan:
    return plan_fleet(parse(text, tmp_path / "m.yaml"), gpu=gpu).models[0]


def vllm_parse(argv: list[str]) -> dict[str, Any]:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())
    return vars(parser.parse_args(argv))


DECIDED = {"model", "served_model_name", "host", "port", "dtype", "tensor_parallel_size", "max_model_len",
           "chat_template", "gpu_memory_utilization", "override_generation_config", "middleware",
           "enforce_eager", "revision", "shutdown_timeout", "enable_scale_out"}


def test_argv_for_codefuse_on_a100(tmp_path: Path) -> None:
    plan = _plan(tmp_path, f"models:\n  - name: cf\n    source: {CODEFUSE}\n    min_concurrent_sequences: 8\n",
                 gpu="a100-40gb")
    cmd = engine_command(plan, host="0.0.0.0", port=9001, python="python3")
    assert cmd.argv[:3] == ["python3", "-m", VLLM_MODULE]
    args = vllm_parse(cmd.argv[3:])
    assert args["model"] == CODEFUSE
    assert args["served_model_name"] == ["cf"]
    assert args["tensor_parallel_size"] == 4
    assert args["max_model_len"] == 16384
    assert args["gpu_memory_utilization"] == 0.9
    assert args["dtype"] == "bfloat16"
    assert Path(args["chat_template"]).name == "codefuse.jinja" and Path(args["chat_template"]).is_file()
    assert args["middleware"] == [MIDDLEWARE]
    assert json.loads(cmd.env["CODEFLEET_REQUEST_DEFAULTS"]) == {"stop_tokens": ["</s>"], "stop": []}
    assert "VLLM_CPU_KVCACHE_SPACE" not in cmd.env and "VLLM_HOST_IP" not in cmd.env


@pytest.mark.parametrize(("policy", "render"), [("cache_aware", True), ("round_robin", False),
                                               ("power_of_two", False)])
def test_render_endpoints_only_for_cache_aware(tmp_path: Path, policy: str, render: bool) -> None:
    # cache_aware gets the prompts' token ids from the engines' render endpoints; vLLM 0.32 serves
    # them only with --enable-scale-out (vllm/entrypoints/scale_out/factories.py)
    plan = _plan(tmp_path, f"router: {{policy: {policy}}}\nmodels:\n  - name: cf\n    source: {CODEFUSE}\n",
                 gpu="h100-80gb")
    assert plan.render_endpoints is render
    assert vllm_parse(engine_command(plan, host="h", port=1).argv[3:])["enable_scale_out"] is render


def test_card_sampling_defaults_reach_vllm(tmp_path: Path) -> None:
    plan = _plan(tmp_path, f"models:\n  - name: cf\n    source: {CODEFUSE}\n", gpu="h100-80gb")
    args = vllm_parse(engine_command(plan, host="h", port=1).argv[3:])
    assert args["override_generation_config"] == {"temperature": 0.1, "top_p": 0.95}


def test_flags_codefleet_does_not_decide_keep_vllm_defaults(tmp_path: Path) -> None:
    plan = _plan(tmp_path, f"models:\n  - name: cf\n    source: {CODEFUSE}\n", gpu="h100-80gb")
    ours = vllm_parse(engine_command(plan, host="h", port=1).argv[3:])
    plain = vllm_parse(["--model", CODEFUSE])
    differing = {k for k in plain if ours[k] != plain[k]}
    assert differing <= DECIDED, differing - DECIDED
    # max_num_seqs, block size, prefix caching, chunked prefill... untouched.
    for key in ("max_num_seqs", "block_size", "enable_prefix_caching", "max_num_batched_tokens"):
        assert key in plain, f"vLLM has no {key} any more: update this list"
        assert ours[key] == plain[key], key


def test_engine_args_pass_through_untouched(tmp_path: Path) -> None:
    text = (f"models:\n  - name: cf\n    source: {CODEFUSE}\n    engine_args:\n      max_num_seqs: 64\n"
            "      enable_prefix_caching: false\n      enforce_eager: true\n"
            "      kv_cache_dtype: fp8\n")
    plan = _plan(tmp_path, text, gpu="h100-80gb")
    args = vllm_parse(engine_command(plan, host="h", port=1).argv[3:])
    assert args["max_num_seqs"] == 64
    assert args["enable_prefix_caching"] is False
    assert args["enforce_eager"] is True
    assert args["kv_cache_dtype"] == "fp8"


def test_cpu_demo_env(tmp_path: Path) -> None:
    text = ("defaults: {gpu: cpu, cpu_kv_cache_gib: 2}\nmodels:\n  - name: t\n    source: demo://codefuse\n"
            "    tensor_parallel_size: 2\n")
    plan = _plan(tmp_path, text)
    cmd = engine_command(plan, host="127.0.0.1", port=1, enforce_eager=True)
    args = vllm_parse(cmd.argv[3:])
    assert args["enforce_eager"] is True
    assert "gpu_memory_utilization" not in cmd.argv
    assert cmd.env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert cmd.env["VLLM_HOST_IP"] == "127.0.0.1"
    assert cmd.env["HF_HUB_OFFLINE"] == "1"
    assert "|" in cmd.env["VLLM_CPU_OMP_THREADS_BIND"]


@pytest.mark.parametrize(("tp", "cores", "expected"), [(2, [0, 1], "0|1"), (2, [0, 1, 2, 3], "0,1|2,3"),
                                                        (4, [0, 1, 2, 3, 4, 5, 6, 7], "0,1|2,3|4,5|6,7")])
def test_cpu_binding(tp: int, cores: list[int], expected: str) -> None:
    assert cpu_binding(tp, cores) == expected


def test_revision_passed_once_and_unset_flags_omitted(tmp_path: Path) -> None:
    text = f"models:\n  - name: cf\n    source: {CODEFUSE}\n"
    plain = _plan(tmp_path, text, gpu="h100-80gb")
    assert "--revision" not in engine_command(plain, host="h", port=1).argv
    pinned = _plan(tmp_path, text + "    revision: 0123abc\n", gpu="h100-80gb")
    argv = engine_command(pinned, host="h", port=1).argv
    assert argv.count("--revision") == 1 and vllm_parse(argv[3:])["revision"] == "0123abc"


def test_argv_is_a_rendering_of_the_spec(tmp_path: Path) -> None:
    plan = _plan(tmp_path, f"models:\n  - name: cf\n    source: {CODEFUSE}\n    engine_args: {{max_num_seqs: 8}}\n",
                 gpu="h100-80gb")
    spec = engine_spec(plan, loopback=False)
    argv = engine_command(plan, host="0.0.0.0", port=8000, python="python3").argv
    assert argv[-len(flags_argv(spec.flags)):] == flags_argv(spec.flags)
    assert spec.flags["max_num_seqs"] == 8 and "--max-num-seqs" in flags_argv(spec.flags)


@pytest.mark.parametrize(("flags", "argv"), [
    ({"a_b": True, "c": False, "d": None}, ["--a-b", "--no-c"]),
    ({"x": [1, "y"], "j": {"k": 1}}, ["--x", "1", "y", "--j", '{"k": 1}']),
])
def test_flags_argv(flags: dict[str, Any], argv: list[str]) -> None:
    assert flags_argv(flags) == argv
