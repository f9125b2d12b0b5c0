"""What reaches vllm-router: its argv, parsed by vllm-router's own argument parser."""

from __future__ import annotations

import pytest

from codefleet.manifest import CacheAware
from codefleet.router import router_argv


def parsed(argv: list[str]):  # type: ignore[no-untyped-def]
    from vllm_router.launch_router import parse_router_args

    assert argv[1:3] == ["-m", "vllm_router.launch_router"]
    return parse_router_args(argv[3:])


def test_cache_aware_gets_codefleets_thresholds_not_the_routers() -> None:
    args = parsed(router_argv("python", "cache_aware", 8001, "127.0.0.1", 9402))
    ours = CacheAware()
    assert args.policy == "cache_aware"
    assert args.cache_threshold == pytest.approx(ours.cache_threshold)
    assert args.balance_abs_threshold == ours.balance_abs_threshold
    assert args.balance_rel_threshold == pytest.approx(ours.balance_rel_threshold)
    assert args.max_tree_size == ours.max_tree_size
    assert args.eviction_interval_secs == ours.eviction_interval_s
    # the router's own defaults, which let one shared system prompt pull everything onto one replica
    plain = parsed(["python", "-m", "vllm_router.launch_router", "--policy", "cache_aware"])
    assert (plain.cache_threshold, plain.balance_abs_threshold) != (args.cache_threshold, args.balance_abs_threshold)


def test_manifest_settings_reach_the_router() -> None:
    c = CacheAware(cache_threshold=0.7, balance_abs_threshold=5, balance_rel_threshold=2.0, max_tree_size=4096,
                   eviction_interval_s=30)
    args = parsed(router_argv("python", "cache_aware", 8001, "127.0.0.1", 9402, c))
    assert (args.cache_threshold, args.balance_abs_threshold, args.balance_rel_threshold, args.max_tree_size,
            args.eviction_interval_secs) == (pytest.approx(0.7), 5, pytest.approx(2.0), 4096, 30)


def test_other_policies_get_no_cache_flags() -> None:
    argv = router_argv("python", "round_robin", 8001, "127.0.0.1", 9402, CacheAware(cache_threshold=0.9))
    assert "--cache-threshold" not in argv
    assert parsed(argv).policy == "round_robin"


def test_prefix_affinity_is_sticky_least_loaded_on_the_gateways_keys() -> None:
    from codefleet.manifest import PrefixAffinity, Router
    from codefleet.router import gateway_affinity, router_env

    assert Router().policy == "prefix_affinity"  # the default: benchmarks/scenarios/prefix-routing/README.md
    router = Router(policy="prefix_affinity")
    argv = router_argv("python", router.policy, 8001, "127.0.0.1", 9402, router.cache_aware)
    assert parsed(argv).policy == "sticky_least_loaded" and "--cache-threshold" not in argv
    assert router_env(router) == {"VLLM_ROUTER_SLL_SESSION_EXPIRATION_IN_S": "600"}
    assert gateway_affinity(router) == {"chunk_chars": 256, "min_share": 0.5, "spill": 1.25, "index_chunks": 200_000}
    other = Router(policy="round_robin", prefix_affinity=PrefixAffinity(chunk_chars=64))
    assert router_env(other) == {} and gateway_affinity(other) is None
