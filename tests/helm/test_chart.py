"""helm/codefleet: lint, render, Kubernetes schema validation (strict), and what the objects say.

Offline: helm-python-sdk (Helm's Go SDK) renders and lints; kubernetes-validate checks each
object against the Kubernetes OpenAPI schemas. No cluster is involved.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

from codefleet.engine import VLLM_MODULE, engine_command
from codefleet.errors import PlanError
from codefleet.helm import ENGINE_PORT, helm_values
from codefleet.manifest import load
from codefleet.planner import plan_fleet
from codefleet.plans import FleetPlan

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "codefleet"
FLEET = ROOT / "deploy" / "manifests" / "fleet.yaml"
K8S_VERSION = "1.31.0"
#: Prometheus Operator kinds: no schema in kubernetes-validate; checked field by field below.
CRD_KINDS = {"ServiceMonitor", "PodMonitor", "ScaledObject"}
SECRET_VALUES = {"apiKeys": {"existingSecret": "codefleet-api-keys"}}
#: These renders have no cluster (as under `helm template` or Argo CD): the internal key is given.
INTERNAL_KEY = "k" * 16 + "0123456789abcdef"
OFFLINE = {"internalKey": {"value": INTERNAL_KEY}}


def fleet_plan(gpu: str) -> tuple[Any, FleetPlan]:
    loaded = load(FLEET)
    return loaded, plan_fleet(loaded, gpu=gpu)


def fleet_values(gpu: str = "h100-80gb", **extra: Any) -> dict[str, Any]:
    loaded, plan = fleet_plan(gpu)
    return helm_values(loaded, plan) | OFFLINE | extra


@pytest.fixture(scope="module")
def chart() -> helm_python.Chart:
    return helm_python.Chart.load(str(CHART))


def render(chart: helm_python.Chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    out = chart.render(values, name="codefleet", namespace="llm")
    objs = []
    for path, text in out.items():
        if path.endswith("NOTES.txt"):
            continue
        objs += [d for d in yaml.safe_load_all(text) if d]
    return objs


def by_kind(objs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def engines(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Engine Deployments by served model name."""
    return {d["metadata"]["annotations"]["codefleet.dev/served-model-name"]: d
            for d in by_kind(objs, "Deployment").values()
            if d["metadata"]["labels"]["app.kubernetes.io/component"] == "engine"}


@pytest.fixture(scope="module", params=["h100-80gb", "a100-40gb"])
def fleet(request: pytest.FixtureRequest, chart: helm_python.Chart) -> tuple[FleetPlan, list[dict[str, Any]]]:
    loaded, plan = fleet_plan(request.param)
    return plan, render(chart, helm_values(loaded, plan) | OFFLINE)


def test_lint_clean_with_default_and_fleet_values() -> None:
    for values in (OFFLINE, fleet_values()):
        report = helm_python.lint(str(CHART), values, strict=True, kube_version="v1.31.0")
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert report["errors"] == [] and problems == [], report


def autoscaled(values: dict[str, Any], model: int = 1, **extra: Any) -> dict[str, Any]:
    """The values with one model autoscaled 0..3 (as `codefleet helm-values` writes it)."""
    m = values["models"][model]
    m["autoscaling"] = {"enabled": True, "minReplicas": 0, "maxReplicas": 3, "signal": "waiting",
                        "metricType": "AverageValue", "query": "sum(x)", "threshold": "4", "heldQuery": "sum(y)"}
    return values | extra


DIGEST = "sha256:" + "ab" * 32
MONITORS = {"serviceMonitor": {"enabled": True, "labels": {"release": "kps"}}}


@pytest.mark.parametrize("values", [
    OFFLINE,
    fleet_values(),
    fleet_values(apiKeys={"enabled": True, "keys": ["sk-one-key-0001", "sk-two-key-0002"]}),
    fleet_values(networkPolicy={"enabled": False}, modelCache={"type": "none"}, huggingface={"tokenSecret": "hf"}),
    fleet_values(metrics=MONITORS),
    fleet_values(modelCache={"type": "shared", "storageClassName": "efs", "preload": {"enabled": True}}),
    fleet_values(modelCache={"type": "existingClaim", "existingClaim": "weights", "preload": {"enabled": True}},
                 huggingface={"tokenSecret": "hf"}),
    fleet_values(modelCache={"type": "node", "hostPath": "/mnt/nvme/models"}),
    fleet_values(modelCache={"type": "perPod", "storageClassName": "gp3", "perPodSize": "200Gi"}),
    fleet_values(image={"repository": "r.example/codefleet", "digest": DIGEST},
                 frontendImage={"repository": "r.example/codefleet-frontend", "digest": DIGEST}),
    fleet_values(frontend={"replicas": 1}),
    fleet_values(frontend={"replicas": 3}, networkPolicy={"monitoringNamespace": "observability",
                                                          "monitoringPodLabels": {"app": "prometheus"}}),
    autoscaled(fleet_values(metrics=MONITORS)),
    fleet_values(internalKey={"existingSecret": "my-internal-key"}, engine={"spread": "preferred"}),
], ids=["defaults", "fleet", "chart-made-key-secret", "no-netpol-no-cache-hf-token", "monitors",
        "shared-cache-preload", "existing-claim-preload", "node-cache", "per-pod-cache", "digests",
        "one-frontend", "three-frontends-monitoring-namespace", "autoscaled", "own-internal-key-preferred-spread"])
def test_every_object_validates_strictly(chart: helm_python.Chart, values: dict[str, Any]) -> None:
    objs = render(chart, values)
    assert objs
    for o in objs:
        if o["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(o, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{o['kind']}/{o['metadata']['name']}: {exc}")


def test_fleet_is_complete(fleet: tuple[FleetPlan, list[dict[str, Any]]]) -> None:
    plan, objs = fleet
    deployed = engines(objs)
    assert set(deployed) == {p.name for p in plan.models} and len(deployed) == 5
    services = by_kind(objs, "Service")
    for p in plan.models:
        d = deployed[p.name]
        assert d["spec"]["replicas"] == p.placement.replicas
        svc = services[d["metadata"]["name"]]
        assert svc["spec"]["clusterIP"] == "None"
        assert svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
        assert d["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]
    assert "codefleet-frontend" in by_kind(objs, "Deployment")
    assert services["codefleet"]["spec"]["selector"]["app.kubernetes.io/component"] == "frontend"
    assert not by_kind(objs, "PersistentVolumeClaim"), "the default cache is per pod: no shared claim to stay Pending"
    assert "codefleet-internal-key" in by_kind(objs, "Secret")


def test_gpus_equal_tensor_parallel_size(fleet: tuple[FleetPlan, list[dict[str, Any]]]) -> None:
    plan, objs = fleet
    deployed = engines(objs)
    for p in plan.models:
        (c,) = deployed[p.name]["spec"]["template"]["spec"]["containers"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == p.placement.tensor_parallel_size
        assert c["resources"]["requests"]["nvidia.com/gpu"] == p.placement.tensor_parallel_size
        args = c["args"]
        assert args[args.index("--tensor-parallel-size") + 1] == str(p.placement.tensor_parallel_size)
    assert sum(p.placement.tensor_parallel_size * p.placement.replicas for p in plan.models) == plan.total_gpus


def flag_groups(argv: list[str]) -> list[tuple[str, ...]]:
    """``--flag value ...`` groups, sorted: vLLM's parser does not care about their order."""
    out: list[list[str]] = []
    for a in argv:
        if a.startswith("--"):
            out.append([a])
        else:
            out[-1].append(a)
    return sorted(tuple(g) for g in out)


def test_engine_command_is_the_local_runners(fleet: tuple[FleetPlan, list[dict[str, Any]]]) -> None:
    """The chart's argv and env are engine_command's, except the chat template's path."""
    plan, objs = fleet
    deployed = engines(objs)
    for p in plan.models:
        (c,) = deployed[p.name]["spec"]["template"]["spec"]["containers"]
        want = engine_command(p, host="0.0.0.0", port=ENGINE_PORT, python="python3")
        argv = want.argv[:]
        argv[argv.index("--chat-template") + 1] = f"/etc/codefleet/chat-templates/{p.generation.chat_template.name}"
        assert c["command"] == argv[:3] == ["python3", "-m", VLLM_MODULE]
        assert flag_groups(c["args"]) == flag_groups(argv[3:])
        env = {e["name"]: e.get("value") for e in c["env"]}
        for k, v in want.env.items():
            assert env[k] == v, k


def test_chat_template_mounted_and_passed(fleet: tuple[FleetPlan, list[dict[str, Any]]]) -> None:
    plan, objs = fleet
    (cm,) = [o for o in by_kind(objs, "ConfigMap").values() if o["metadata"]["name"].endswith("chat-templates")]
    for p in plan.models:
        spec = engines(objs)[p.name]["spec"]["template"]["spec"]
        (c,) = spec["containers"]
        path = c["args"][c["args"].index("--chat-template") + 1]
        mount = next(m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
        volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
        assert volume["configMap"]["name"] == cm["metadata"]["name"]
        assert cm["data"][Path(path).name] == p.generation.chat_template.read_text().rstrip("\n")


def test_probes_and_shm(fleet: tuple[FleetPlan, list[dict[str, Any]]]) -> None:
    plan, objs = fleet
    for p in plan.models:
        spec = engines(objs)[p.name]["spec"]["template"]["spec"]
        (c,) = spec["containers"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
        start = c["startupProbe"]
        # Long loads: at least 10 minutes, more for bigger weights.
        assert start["periodSeconds"] * start["failureThreshold"] >= 600
        shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["medium"] == "Memory"
        assert any(m["mountPath"] == "/dev/shm" for m in c["volumeMounts"])
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
    budgets = {c["startupProbe"]["failureThreshold"]
               for d in engines(objs).values() for c in d["spec"]["template"]["spec"]["containers"]}
    assert len(budgets) > 1, "start-up budget should grow with the weights"


def test_engines_drain_before_they_go(fleet: tuple[FleetPlan, list[dict[str, Any]]]) -> None:
    """preStop keeps a leaving pod serving until the frontend has stopped sending to it, vLLM then
    drains for the model's budget (--shutdown-timeout), and the grace period covers both."""
    plan, objs = fleet
    for p in plan.models:
        d = engines(objs)[p.name]
        spec = d["spec"]["template"]["spec"]
        (c,) = spec["containers"]
        args = c["args"]
        assert args[args.index("--shutdown-timeout") + 1] == str(p.drain_seconds)
        pre = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
        assert pre >= 2 * 2 + 1  # two DNS refreshes of the frontend (discoveryInterval 2 s), and some
        assert spec["terminationGracePeriodSeconds"] == pre + p.drain_seconds + 15
        assert d["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    fe = by_kind(objs, "Deployment")["codefleet-frontend"]
    cfg = json.loads(by_kind(objs, "ConfigMap")["codefleet-frontend"]["data"]["frontend.json"])
    assert fe["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == cfg["drain_seconds"] + 15


def test_surge_rollout_adds_before_it_removes(chart: helm_python.Chart) -> None:
    values = fleet_values()
    values["engine"] = {"maxSurge": 1}
    for d in engines(render(chart, values)).values():
        assert d["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


def test_frontend_limits_reach_the_gateway(chart: helm_python.Chart) -> None:
    values = fleet_values()
    values["frontend"]["limits"] = {"header_timeout_s": 10, "max_connections": 20000}
    cm = by_kind(render(chart, values), "ConfigMap")["codefleet-frontend"]
    from codefleet.discovery import FrontendConfig
    limits = FrontendConfig.model_validate(json.loads(cm["data"]["frontend.json"])).router.limits
    assert (limits.header_timeout_s, limits.max_connections, limits.body_timeout_s) == (10, 20000, 60)


def test_frontend_routes_to_every_model(fleet: tuple[FleetPlan, list[dict[str, Any]]]) -> None:
    plan, objs = fleet
    cm = by_kind(objs, "ConfigMap")["codefleet-frontend"]
    cfg = json.loads(cm["data"]["frontend.json"])
    services = by_kind(objs, "Service")
    deployed = engines(objs)
    assert [t["model"] for t in cfg["targets"]] == [p.name for p in plan.models]
    for t in cfg["targets"]:
        svc_name, ns = t["host"].split(".")[:2]
        assert ns == "llm" and t["host"].endswith(".svc.cluster.local")
        assert svc_name == deployed[t["model"]]["metadata"]["name"] and svc_name in services
        assert t["port"] == services[svc_name]["spec"]["ports"][0]["port"] == ENGINE_PORT
    assert cfg["router"]["policy"] == plan.router.policy
    assert cfg["router"]["api_keys"] == {"file": "/etc/codefleet/api-keys/keys"}
    # The frontend parses the rendered config with its own model.
    from codefleet.discovery import FrontendConfig
    FrontendConfig.model_validate(cfg)
    fe = by_kind(objs, "Deployment")["codefleet-frontend"]
    (c,) = fe["spec"]["template"]["spec"]["containers"]
    assert c["command"][:4] == ["codefleet", "frontend", "--config", "/etc/codefleet/frontend/frontend.json"]
    keys_volume = next(v for v in fe["spec"]["template"]["spec"]["volumes"] if v["name"] == "api-keys")
    assert keys_volume["secret"]["secretName"] == "codefleet-api-keys"
    # Engines and frontend share the internal key.
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for d in [*deployed.values(), fe]
            for e in d["spec"]["template"]["spec"]["containers"][0]["env"]
            if e["name"] in ("VLLM_API_KEY", "CODEFLEET_UPSTREAM_KEY")}
    assert refs == {"codefleet-internal-key"}


def test_network_policy_admits_only_the_frontend(fleet: tuple[FleetPlan, list[dict[str, Any]]]) -> None:
    _, objs = fleet
    (np,) = by_kind(objs, "NetworkPolicy").values()
    engine_labels = next(iter(engines(objs).values()))["spec"]["template"]["metadata"]["labels"]
    fe_labels = by_kind(objs, "Deployment")["codefleet-frontend"]["spec"]["template"]["metadata"]["labels"]
    assert np["spec"]["podSelector"]["matchLabels"].items() <= engine_labels.items()
    assert not np["spec"]["podSelector"]["matchLabels"].items() <= fe_labels.items()
    assert np["spec"]["policyTypes"] == ["Ingress"]
    rule, monitoring = np["spec"]["ingress"]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}
    assert peer["podSelector"]["matchLabels"].items() <= fe_labels.items()
    assert not peer["podSelector"]["matchLabels"].items() <= engine_labels.items()
    assert rule["ports"] == [{"port": ENGINE_PORT, "protocol": "TCP"}]
    # Prometheus in the monitoring namespace scrapes the engines (default namespace: monitoring).
    assert monitoring == {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
                          "ports": [{"port": ENGINE_PORT, "protocol": "TCP"}]}


def test_monitoring_namespace_is_configurable(chart: helm_python.Chart) -> None:
    objs = render(chart, fleet_values(networkPolicy={"monitoringNamespace": "observability",
                                                     "monitoringPodLabels": {"app": "prometheus"}}))
    (np,) = by_kind(objs, "NetworkPolicy").values()
    (peer,) = np["spec"]["ingress"][1]["from"]
    assert peer == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}},
                    "podSelector": {"matchLabels": {"app": "prometheus"}}}
    (np,) = by_kind(render(chart, fleet_values(networkPolicy={"monitoringNamespace": ""})), "NetworkPolicy").values()
    assert len(np["spec"]["ingress"]) == 1


def test_disruption_budgets(fleet: tuple[FleetPlan, list[dict[str, Any]]]) -> None:
    plan, objs = fleet
    pdbs = by_kind(objs, "PodDisruptionBudget")
    assert pdbs["codefleet-frontend"]["spec"] == {
        "maxUnavailable": 1, "selector": by_kind(objs, "Deployment")["codefleet-frontend"]["spec"]["selector"]}
    for p in plan.models:
        name = engines(objs)[p.name]["metadata"]["name"]
        assert pdbs[name]["spec"]["maxUnavailable"] == 1


def test_disruption_budgets_never_block_a_drain(chart: helm_python.Chart) -> None:
    """A budget over one pod blocks every node drain: one frontend pod or a one-replica model gets
    none; an autoscaled model gets one when it can have two or more."""
    values = fleet_values(frontend={"replicas": 1})
    values["models"][0]["replicas"] = 1
    objs = render(chart, autoscaled(values, model=1, metrics=MONITORS))
    pdbs = by_kind(objs, "PodDisruptionBudget")
    deployed = {m["name"]: engines(objs)[m["name"]]["metadata"]["name"] for m in values["models"]}
    assert "codefleet-frontend" not in pdbs
    assert deployed[values["models"][0]["name"]] not in pdbs
    assert deployed[values["models"][1]["name"]] in pdbs  # autoscaled 0..3
    assert len(pdbs) == len(values["models"]) - 1
    for pdb in pdbs.values():
        assert set(pdb["spec"]) == {"maxUnavailable", "selector"} and pdb["spec"]["maxUnavailable"] == 1


def anti_affinity(deployment: dict[str, Any]) -> dict[str, Any] | None:
    return deployment["spec"]["template"]["spec"].get("affinity", {}).get("podAntiAffinity")


def test_replicas_of_a_model_cannot_share_a_node(chart: helm_python.Chart) -> None:
    """Two or more replicas (or maxReplicas): a required anti-affinity on the node name against the
    model's own pods (and only its own: another model may share the node). One replica: no rule."""
    values = fleet_values()
    values["models"][0]["replicas"] = 1
    objs = render(chart, autoscaled(values, model=2, metrics=MONITORS))
    for i, m in enumerate(values["models"]):
        d = engines(objs)[m["name"]]
        rule = anti_affinity(d)
        if i == 0:
            assert rule is None, "one replica: nothing to keep apart"
            continue
        (term,) = rule["requiredDuringSchedulingIgnoredDuringExecution"]
        assert term["topologyKey"] == "kubernetes.io/hostname"
        pod_labels = d["spec"]["template"]["metadata"]["labels"]
        assert term["labelSelector"]["matchLabels"] == pod_labels, "selects exactly this model's pods"
        for other in values["models"]:
            if other is not m:
                other_labels = engines(objs)[other["name"]]["spec"]["template"]["metadata"]["labels"]
                assert not term["labelSelector"]["matchLabels"].items() <= other_labels.items()


def test_spread_can_be_relaxed_or_replaced(chart: helm_python.Chart) -> None:
    values = fleet_values(engine={"spread": "preferred"})
    own = {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 1, "podAffinityTerm": {"topologyKey": "topology.kubernetes.io/zone",
                                          "labelSelector": {"matchLabels": {"codefleet.dev/model": "x"}}}}]},
           "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
               {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["gpu"]}]}]}}}
    values["models"][0]["affinity"] = own
    values["models"][1]["spread"] = "required"
    objs = render(chart, values)
    ms = values["models"]
    assert engines(objs)[ms[0]["name"]]["spec"]["template"]["spec"]["affinity"] == own  # the model's own rule wins
    assert "requiredDuringSchedulingIgnoredDuringExecution" in anti_affinity(engines(objs)[ms[1]["name"]])
    (pref,) = anti_affinity(engines(objs)[ms[2]["name"]])["preferredDuringSchedulingIgnoredDuringExecution"]
    assert pref["weight"] == 100 and pref["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"


def internal_keys(objs: list[dict[str, Any]]) -> set[str]:
    import base64
    return {base64.b64decode(s["data"]["key"]).decode() for s in by_kind(objs, "Secret").values()
            if s["metadata"]["name"].endswith("internal-key")}


def test_internal_key_without_cluster_access_is_the_same_or_refused(chart: helm_python.Chart) -> None:
    """No cluster to look the stored key up in (helm template, Argo CD): a generated key would differ
    between two renders, so the chart refuses and says what to set; a given key is the same in both."""
    values = fleet_values()
    values.pop("internalKey")
    for _ in range(2):
        with pytest.raises(helm_python.HelmRenderError, match="internalKey: rendering without cluster access") as err:
            render(chart, values)
        assert "internalKey.existingSecret" in str(err.value) and "internalKey.value" in str(err.value)
    given = fleet_values()
    assert internal_keys(render(chart, given)) == internal_keys(render(chart, given)) == {INTERNAL_KEY}
    # Or a Secret of the operator's own: the chart makes none, every pod reads that one.
    objs = render(chart, fleet_values(internalKey={"existingSecret": "my-internal-key"}))
    assert internal_keys(objs) == set()
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for d in by_kind(objs, "Deployment").values()
            for e in d["spec"]["template"]["spec"]["containers"][0]["env"]
            if e["name"] in ("VLLM_API_KEY", "CODEFLEET_UPSTREAM_KEY")}
    assert refs == {"my-internal-key"}
    with pytest.raises(helm_python.HelmValuesError, match="/internalKey/value"):
        render(chart, fleet_values(internalKey={"value": "short"}))


def cache_volume(d: dict[str, Any]) -> dict[str, Any]:
    return next(v for v in d["spec"]["template"]["spec"]["volumes"] if v["name"] == "model-cache")


def test_weight_cache_choices(chart: helm_python.Chart) -> None:
    values = fleet_values()
    # default perPod: a ReadWriteOnce volume of each pod's own, sized from the model's weights
    objs = render(chart, values)
    for m in values["models"]:
        v = cache_volume(engines(objs)[m["name"]])["ephemeral"]["volumeClaimTemplate"]["spec"]
        assert v["accessModes"] == ["ReadWriteOnce"] and "storageClassName" not in v
        assert v["resources"]["requests"]["storage"] == f"{m['cacheGiB']}Gi"
        assert m["cacheGiB"] >= m["plan"]["weightsGiBPerGpu"] * m["tensorParallelSize"] + 10
    # shared: one ReadWriteMany claim every engine mounts
    objs = render(chart, fleet_values(modelCache={"type": "shared", "storageClassName": "efs"}))
    (pvc,) = by_kind(objs, "PersistentVolumeClaim").values()
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and pvc["spec"]["storageClassName"] == "efs"
    assert {cache_volume(d)["persistentVolumeClaim"]["claimName"] for d in engines(objs).values()} == \
        {pvc["metadata"]["name"]}
    objs = render(chart, fleet_values(modelCache={"type": "existingClaim", "existingClaim": "weights"}))
    assert not by_kind(objs, "PersistentVolumeClaim")
    assert {cache_volume(d)["persistentVolumeClaim"]["claimName"] for d in engines(objs).values()} == {"weights"}
    objs = render(chart, fleet_values(modelCache={"type": "node", "hostPath": "/mnt/nvme/models"}))
    assert {str(cache_volume(d)["hostPath"]) for d in engines(objs).values()} == \
        {str({"path": "/mnt/nvme/models", "type": "Directory"})}
    objs = render(chart, fleet_values(modelCache={"type": "none"}))
    assert all("emptyDir" in cache_volume(d) for d in engines(objs).values())


@pytest.mark.parametrize(("cache", "message"), [
    ({"type": "perPod", "preload": {"enabled": True}}, "/modelCache/type"),
    ({"type": "node", "preload": {"enabled": True}}, "/modelCache/type"),
    ({"type": "existingClaim"}, "existingClaim"),
    ({"enabled": True}, "additional properties 'enabled' not allowed"),
])
def test_cache_values_refused_where_they_cannot_work(chart: helm_python.Chart, cache: dict[str, Any],
                                                     message: str) -> None:
    with pytest.raises(helm_python.HelmValuesError, match=message):
        render(chart, fleet_values(modelCache=cache))


def test_preload_fills_the_cache_before_engines_start(chart: helm_python.Chart) -> None:
    values = fleet_values(modelCache={"type": "shared", "preload": {"enabled": True}})
    values["models"][0]["revision"] = "0123abc"
    objs = render(chart, values)
    jobs = by_kind(objs, "Job")
    assert len(jobs) == len(values["models"])
    for m in values["models"]:
        (job,) = [j for j in jobs.values() if j["metadata"]["labels"]["codefleet.dev/model"] == m["key"]]
        (c,) = job["spec"]["template"]["spec"]["containers"]
        rev = ["--revision", m["revision"]] if "revision" in m else []
        assert c["command"] == ["python3", "-m", "codefleet.preload", m["model"], *rev]
        assert cache_volume(job)["persistentVolumeClaim"]["claimName"] == "codefleet-model-cache"
        (init,) = engines(objs)[m["name"]]["spec"]["template"]["spec"]["initContainers"]
        assert init["command"][:4] == ["python3", "-m", "codefleet.preload", "--wait"]
        assert init["command"][4:5 + len(rev)] == [m["model"], *rev]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["HF_HOME"] == {e["name"]: e.get("value") for e in init["env"]}["HF_HOME"] == "/models"
    # a new revision is a new Job (a Job's pod template cannot change)
    values["models"][0]["revision"] = "4567def"
    assert set(by_kind(render(chart, values), "Job")) != set(jobs)


def test_images_by_digest_and_a_small_frontend_image(chart: helm_python.Chart) -> None:
    objs = render(chart, fleet_values(image={"repository": "r.example/codefleet", "digest": DIGEST},
                                      frontendImage={"repository": "r.example/fe", "digest": DIGEST},
                                      modelCache={"type": "shared", "preload": {"enabled": True}}))
    pods = [d["spec"]["template"]["spec"] for d in [*by_kind(objs, "Deployment").values(), *by_kind(objs, "Job").values()]]
    pods += [o["spec"] for o in by_kind(objs, "Pod").values()]
    images = {}
    for pod in pods:
        for c in pod.get("initContainers", []) + pod["containers"]:
            images[c["name"]] = images.get(c["name"], set()) | {c["image"]}
    assert images["vllm"] == images["preload"] == images["wait-for-weights"] == {f"r.example/codefleet@{DIGEST}"}
    assert images["frontend"] == images["smoke"] == {f"r.example/fe@{DIGEST}"}
    objs = render(chart, fleet_values())
    fe = by_kind(objs, "Deployment")["codefleet-frontend"]["spec"]["template"]["spec"]["containers"][0]
    assert fe["image"] == "ghcr.io/codefleet/codefleet-frontend:0.1.0"


def test_helm_test_pod_runs_smoke_with_each_models_family(chart: helm_python.Chart) -> None:
    from codefleet.cli import build_parser

    values = fleet_values(apiKeys={"enabled": True, "existingSecret": "codefleet-api-keys"})
    objs = render(chart, values)
    (pod,) = by_kind(objs, "Pod").values()
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (c,) = pod["spec"]["containers"]
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    args = build_parser().parse_args(c["command"][1:])  # what `codefleet` in the pod will parse
    assert args.func.__name__ == "cmd_smoke" and args.base_url == "http://codefleet.llm.svc:80"
    assert args.api_key_file == "/etc/codefleet/api-keys/keys"
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/etc/codefleet/chat-templates", "/etc/codefleet/api-keys"} <= mounts
    want = {f"{m['name']}={m['family']}:/etc/codefleet/chat-templates/{m['chatTemplate']}" for m in values["models"]}
    assert set(args.expect) == want


def test_autoscaling_needs_a_prometheus_that_scrapes(chart: helm_python.Chart) -> None:
    with pytest.raises(helm_python.HelmRenderError, match="autoscaling reads Prometheus"):
        render(chart, autoscaled(fleet_values()))
    assert by_kind(render(chart, autoscaled(fleet_values(keda={"externalScrape": True}))), "ScaledObject")


def test_monitors_carry_model_replica_node(chart: helm_python.Chart) -> None:
    objs = render(chart, fleet_values(metrics={"serviceMonitor": {"enabled": True}}))
    (pm,) = by_kind(objs, "PodMonitor").values()
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    targets = {r["targetLabel"]: r["sourceLabels"][0] for r in ep["relabelings"]}
    assert targets == {"model": "__meta_kubernetes_pod_annotation_codefleet_dev_served_model_name",
                       "replica": "__meta_kubernetes_pod_name", "node": "__meta_kubernetes_pod_node_name"}
    (sm,) = by_kind(objs, "ServiceMonitor").values()
    assert {e["port"] for e in sm["spec"]["endpoints"]} == {"metrics", "gateway-metrics", "router-metrics"}


#: The parts of KEDA's ScaledObject (keda.sh/v1alpha1, KEDA 2.x CRD, config/crd/bases in kedacore/keda)
#: the chart writes, as a JSON schema written here from the CRD: the CRD itself is not packaged for
#: offline use. Catches what KEDA refuses at apply time: unknown fields, non-integer counts,
#: trigger metadata that is not a string map, a metricType KEDA does not know.
KEDA_SCALEDOBJECT = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"}, "kind": {"const": "ScaledObject"},
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {"type": "object", "additionalProperties": False, "required": ["name"],
                                   "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                                  "name": {"type": "string"},
                                                  "envSourceContainerName": {"type": "string"}}},
                **{k: {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
                   for k in ("minReplicaCount", "maxReplicaCount", "pollingInterval", "cooldownPeriod",
                             "idleReplicaCount")},
                "advanced": {"type": "object", "additionalProperties": False, "properties": {
                    "restoreToOriginalReplicaCount": {"type": "boolean"},
                    "horizontalPodAutoscalerConfig": {"type": "object", "additionalProperties": False, "properties": {
                        "name": {"type": "string"},
                        "behavior": {"type": "object", "additionalProperties": False, "properties": {
                            d: {"type": "object", "additionalProperties": False, "properties": {
                                "stabilizationWindowSeconds": {"type": "integer", "minimum": 0, "maximum": 3600},
                                "selectPolicy": {"type": "string"},
                                "policies": {"type": "array", "items": {
                                    "type": "object", "additionalProperties": False,
                                    "required": ["type", "value", "periodSeconds"],
                                    "properties": {"type": {"enum": ["Pods", "Percent"]},
                                                   "value": {"type": "integer", "minimum": 1},
                                                   "periodSeconds": {"type": "integer", "minimum": 1,
                                                                     "maximum": 1800}}}}}}
                            for d in ("scaleUp", "scaleDown")}}}}}},
                "triggers": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["type", "metadata"],
                    "properties": {"type": {"type": "string"}, "name": {"type": "string"},
                                   "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                                   "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                                   "authenticationRef": {"type": "object"}}}},
            }}}}


def autoscaled_values(tmp_path: Path, auto: str) -> dict[str, Any]:
    text = FLEET.read_text().replace("    source: ibm-granite/granite-3.0-1b-a400m-instruct\n",
                                     "    source: ibm-granite/granite-3.0-1b-a400m-instruct\n" + auto, 1)
    assert text != FLEET.read_text()
    (tmp_path / "fleet.yaml").write_text(text)
    loaded = load(tmp_path / "fleet.yaml")
    return helm_values(loaded, plan_fleet(loaded, gpu="h100-80gb")) | OFFLINE | {"metrics": MONITORS}


def test_autoscaling_is_a_keda_scaledobject_that_scales_from_zero(tmp_path: Path,
                                                                  chart: helm_python.Chart) -> None:
    import jsonschema

    values = autoscaled_values(tmp_path, "    autoscaling: {min_replicas: 0, max_replicas: 4, target: 2, "
                                         "scale_down_delay_seconds: 600, hold_requests: 32}\n")
    objs = render(chart, values)
    assert not by_kind(objs, "HorizontalPodAutoscaler"), "KEDA makes the HPA; the chart ships none"
    (so,) = by_kind(objs, "ScaledObject").values()
    jsonschema.validate(so, KEDA_SCALEDOBJECT)
    m = next(x for x in values["models"] if "autoscaling" in x)
    target = engines(objs)[m["name"]]
    assert so["spec"]["scaleTargetRef"]["name"] == target["metadata"]["name"]
    assert "replicas" not in target["spec"], "KEDA owns the replica count"
    spec = so["spec"]
    assert (spec["minReplicaCount"], spec["maxReplicaCount"], spec["cooldownPeriod"]) == (0, 4, 300)
    assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] \
        == 600
    load_trigger, held = spec["triggers"]
    assert load_trigger["metricType"] == "AverageValue" and load_trigger["metadata"]["threshold"] == "2"
    assert 'vllm:num_requests_waiting{model_name="granite-3.0-1b-a400m-instruct"}' in load_trigger["metadata"]["query"]
    assert held["metadata"]["query"].startswith('sum(codefleet_gateway_held_requests{model="granite-3.0-1b')
    assert held["metadata"]["activationThreshold"] == "0"
    # the frontend holds the model's requests while it is at zero
    (cm,) = [o for o in objs if o["kind"] == "ConfigMap" and "frontend.json" in o.get("data", {})]
    t = next(t for t in json.loads(cm["data"]["frontend.json"])["targets"] if t["model"] == m["name"])
    assert t["hold"] == {"max_requests": 32, "timeout_s": 180, "cold_start_s": 60} and "replicas" not in t
    from codefleet.discovery import FrontendConfig
    FrontendConfig.model_validate_json(cm["data"]["frontend.json"])  # what `codefleet frontend` reads


def test_autoscaling_on_kv_cache_is_a_value_target_without_the_held_trigger(tmp_path: Path,
                                                                            chart: helm_python.Chart) -> None:
    import jsonschema

    values = autoscaled_values(tmp_path, "    autoscaling: {min_replicas: 1, max_replicas: 3, signal: kv_cache}\n")
    (so,) = by_kind(render(chart, values), "ScaledObject").values()
    jsonschema.validate(so, KEDA_SCALEDOBJECT)
    (trigger,) = so["spec"]["triggers"]
    assert trigger["metricType"] == "Value" and trigger["metadata"]["threshold"] == "0.7"
    assert trigger["metadata"]["query"].startswith("avg(vllm:kv_cache_usage_perc{")


@pytest.mark.parametrize(("patch", "message"), [
    ({"frontend": {"policy": "fastest"}}, "/frontend/policy"),
    ({"models": [{"name": "m", "key": "m", "model": "x/y", "replicas": 1, "tensorParallelSize": 3,
                  "chatTemplate": "chatml.jinja"}]}, "/models/0/tensorParallelSize"),
    ({"models": [{"name": "m", "key": "Granite_3", "model": "x/y", "replicas": 1, "tensorParallelSize": 1,
                  "chatTemplate": "chatml.jinja"}]}, "/models/0/key"),
    ({"models": [{"name": "m"}]}, "missing properties 'key', 'model', 'replicas', 'tensorParallelSize', 'chatTemplate'"),
    ({"apiKeys": {"enabled": True}}, "/apiKeys/keys"),
    ({"replicaCount": 3}, "additional properties 'replicaCount' not allowed"),
    ({"modelCache": {"size": "lots"}}, "/modelCache/size"),
    ({"models": [{"name": "m", "key": "m", "model": "x/y", "replicas": -1, "tensorParallelSize": 1,
                  "chatTemplate": "chatml.jinja"}]}, "/models/0/replicas"),
])
def test_schema_rejects_bad_values(chart: helm_python.Chart, patch: dict[str, Any], message: str) -> None:
    with pytest.raises(helm_python.HelmValuesError) as err:
        chart.render(patch, name="codefleet", namespace="llm")
    assert message in str(err.value)


def test_chart_holds_no_template_of_its_own(chart: helm_python.Chart) -> None:
    """One copy of the templates (chat_templates/): the chart gets them through values only."""
    assert not list(CHART.rglob("*.jinja"))
    values = fleet_values()
    values["chatTemplates"].pop("codefuse.jinja")
    with pytest.raises(Exception, match="chatTemplate \"codefuse.jinja\" is not a key of chatTemplates"):
        render(chart, values)


def test_revision_reaches_the_chart_once(tmp_path: Path, chart: helm_python.Chart) -> None:
    text = FLEET.read_text().replace("source: codefuse-ai/CodeFuse-CodeLlama-34B",
                                     "source: codefuse-ai/CodeFuse-CodeLlama-34B\n    revision: 0123abc", 1)
    assert "revision: 0123abc" in text
    (tmp_path / "fleet.yaml").write_text(text)
    loaded = load(tmp_path / "fleet.yaml")
    plan = plan_fleet(loaded, gpu="h100-80gb")
    (c,) = engines(render(chart, helm_values(loaded, plan) | OFFLINE))["codefuse-codellama-34b"]["spec"]["template"]["spec"][
        "containers"]
    assert c["args"].count("--revision") == 1 and c["args"][c["args"].index("--revision") + 1] == "0123abc"


def test_committed_fleet_values_are_current() -> None:
    from codefleet.helm import helm_values_yaml
    loaded, plan = fleet_plan("h100-80gb")
    assert (ROOT / "deploy" / "helm" / "fleet-values.yaml").read_text() == helm_values_yaml(loaded, plan), \
        "regenerate: codefleet helm-values deploy/manifests/fleet.yaml -o deploy/helm/fleet-values.yaml"


def test_helm_values_refuses_cpu_and_demo_plans() -> None:
    loaded = load(ROOT / "deploy" / "manifests" / "demo-cpu.yaml")
    with pytest.raises(PlanError, match="--gpu"):
        helm_values(loaded, plan_fleet(loaded))
    with pytest.raises(PlanError, match="demo checkpoint"):
        helm_values(loaded, plan_fleet(loaded, gpu="h100-80gb"))


def test_tenants_reach_every_frontend_pod_with_its_share(chart: helm_python.Chart) -> None:
    from codefleet.discovery import FrontendConfig

    values = fleet_values(tenants={"ide": {"requests_per_minute": 600, "models": ["stable-code-instruct-3b"]}},
                          apiKeys={"enabled": True, "existingSecret": "codefleet-api-keys"})
    objs = render(chart, values)
    (cm,) = [o for o in objs if o["kind"] == "ConfigMap" and "frontend.json" in o.get("data", {})]
    cfg = FrontendConfig.model_validate_json(cm["data"]["frontend.json"])
    assert cfg.frontend_pods == 2  # the chart's two frontend pods: each enforces half of every rate
    assert cfg.tenants["ide"].requests_per_minute == 600


def test_tuned_moe_config_reaches_the_engine_under_vllms_file_name(chart: helm_python.Chart) -> None:
    values = fleet_values()
    m = values["models"][1]
    name = "E=32,N=512,device_name=NVIDIA_H100_80GB_HBM3.json"
    m["moeConfig"] = {"file": name, "json": '{"1": {"BLOCK_SIZE_M": 16}}'}
    m["env"]["VLLM_TUNED_CONFIG_FOLDER"] = "/etc/codefleet/moe-config"
    objs = render(chart, values)
    for o in objs:
        if o["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(o, K8S_VERSION, strict=True)
    d = engines(objs)[m["name"]]
    spec = d["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    mount = next(x for x in c["volumeMounts"] if x["name"] == "moe-config")
    volume = next(v for v in spec["volumes"] if v["name"] == "moe-config")
    cm = by_kind(objs, "ConfigMap")[volume["configMap"]["name"]]
    assert volume["configMap"]["items"] == [{"key": "config.json", "path": name}]
    assert cm["data"]["config.json"] == m["moeConfig"]["json"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["VLLM_TUNED_CONFIG_FOLDER"] == mount["mountPath"] == "/etc/codefleet/moe-config"
    others = [engines(objs)[x["name"]]["spec"]["template"]["spec"] for x in values["models"] if x is not m]
    assert not any(v["name"] == "moe-config" for o in others for v in o["volumes"])


def test_the_charts_frontend_is_told_what_codefleet_ups_is(tmp_path: Path, chart: helm_python.Chart,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """One way from the plan to the frontend's settings: the chart's values come from
    frontend_settings(plan), and the frontend.json the chart renders from them reads back the same."""
    from codefleet.frontend_config import FrontendConfig, frontend_settings
    from codefleet.router import Frontend

    auto = ("    autoscaling: {min_replicas: 0, max_replicas: 4, hold_requests: 32, hold_timeout_seconds: 90, "
            "cold_start_seconds: 45}\n    max_waiting: 50\n")
    values = autoscaled_values(tmp_path, auto)
    loaded = load(tmp_path / "fleet.yaml")
    up = frontend_settings(plan_fleet(loaded, gpu="h100-80gb"))
    (cm,) = [o for o in render(chart, values) if o["kind"] == "ConfigMap" and "frontend.json" in o.get("data", {})]
    chart_side = FrontendConfig.model_validate_json(cm["data"]["frontend.json"]).settings(tmp_path)
    assert up.hold and up.shed and up.fim  # the case carries a hold, a shedding threshold, models that fill
    for name in ("models", "hold", "shed", "drain_s", "tenants", "fim"):
        assert getattr(chart_side, name) == getattr(up, name), name
    monkeypatch.setenv("CODEFLEET_API_KEYS", "sk-test")  # the manifest's router.api_keys
    fe = Frontend.for_plan(plan_fleet(loaded, gpu="h100-80gb"), tmp_path, "python")
    assert (fe.models, fe.hold, fe.shed, fe.drain_s, fe.fim) == (up.models, up.hold, up.shed, up.drain_s, up.fim)
    # and the engines that fill are told their format (the middleware's settings in their env)
    for name, d in engines(render(chart, values)).items():
        (c,) = d["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert json.loads(env["CODEFLEET_REQUEST_DEFAULTS"]).get("fim") == up.fim.get(name), name


def test_a_hold_without_cold_start_takes_the_manifests_default(tmp_path: Path, chart: helm_python.Chart) -> None:
    from codefleet.frontend_config import FrontendConfig
    from codefleet.gateway.config import COLD_START_S
    from codefleet.manifest import Autoscaling

    values = autoscaled_values(tmp_path, "    autoscaling: {min_replicas: 0, max_replicas: 2}\n")
    m = next(x for x in values["models"] if "autoscaling" in x)
    del m["autoscaling"]["hold"]["coldStartSeconds"]  # values written by hand
    (cm,) = [o for o in render(chart, values) if o["kind"] == "ConfigMap" and "frontend.json" in o.get("data", {})]
    t = next(t for t in json.loads(cm["data"]["frontend.json"])["targets"] if t["model"] == m["name"])
    assert "cold_start_s" not in t["hold"]
    hold = FrontendConfig.model_validate_json(cm["data"]["frontend.json"]).settings(tmp_path).hold[m["name"]]
    assert hold.cold_start_s == COLD_START_S == Autoscaling.model_fields["cold_start_seconds"].default == 60


def test_a_manifests_migration_settings_reach_the_charts_gateway(tmp_path: Path, chart: helm_python.Chart) -> None:
    from codefleet.frontend_config import FrontendConfig
    from codefleet.manifest import Migration

    text = FLEET.read_text().replace("  policy: prefix_affinity\n",
                                     "  policy: prefix_affinity\n  migration: {limit: 1, timeout_s: 12}\n", 1)
    (tmp_path / "fleet.yaml").write_text(text)
    loaded = load(tmp_path / "fleet.yaml")
    values = helm_values(loaded, plan_fleet(loaded, gpu="h100-80gb")) | OFFLINE
    assert values["frontend"]["migration"] == {"limit": 1, "timeout_s": 12.0}
    (cm,) = [o for o in render(chart, values) if o["kind"] == "ConfigMap" and "frontend.json" in o.get("data", {})]
    router = FrontendConfig.model_validate_json(cm["data"]["frontend.json"]).settings(tmp_path).router
    assert router.migration == Migration(limit=1, timeout_s=12)
    assert "migration" not in fleet_values()["frontend"]  # the defaults are not written out


def test_speculative_reaches_the_chart_as_one_argument(tmp_path: Path, chart: helm_python.Chart) -> None:
    spec = "{method: ngram, num_speculative_tokens: 4, prompt_lookup_min: 2, prompt_lookup_max: 4}"
    text = FLEET.read_text().replace("source: codefuse-ai/CodeFuse-CodeLlama-34B",
                                     f"source: codefuse-ai/CodeFuse-CodeLlama-34B\n    speculative: {spec}", 1)
    assert spec in text
    (tmp_path / "fleet.yaml").write_text(text)
    loaded = load(tmp_path / "fleet.yaml")
    plan = plan_fleet(loaded, gpu="h100-80gb")
    (c,) = engines(render(chart, helm_values(loaded, plan) | OFFLINE))["codefuse-codellama-34b"]["spec"]["template"]["spec"][
        "containers"]
    assert c["args"].count("--speculative-config") == 1
    assert json.loads(c["args"][c["args"].index("--speculative-config") + 1]) == {
        "method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}


def test_adapters_are_fetched_loaded_at_start_and_routed(tmp_path: Path, chart: helm_python.Chart) -> None:
    """A model's LoRA adapters: each pod's fetch-adapters init container downloads them (with their
    revision) into the weight cache volume, vLLM loads them before it serves (--lora-modules, parsed
    by vLLM's own parser), and the frontend is told to register each ready pod under each adapter."""
    from codefleet.discovery import FrontendConfig
    from tests.unit.test_engine_argv import vllm_parse

    text = FLEET.read_text().replace(
        "source: codefuse-ai/CodeFuse-CodeLlama-34B",
        "source: codefuse-ai/CodeFuse-CodeLlama-34B\n    adapters: [{name: cf-team, source: org/cf-team-lora, "
        "revision: abc123}, {name: cf-ops, source: org/cf-ops-lora}]\n    max_lora_rank: 16", 1)
    (tmp_path / "fleet.yaml").write_text(text)
    loaded = load(tmp_path / "fleet.yaml")
    objs = render(chart, helm_values(loaded, plan_fleet(loaded, gpu="h100-80gb")) | OFFLINE)
    pod = engines(objs)["codefuse-codellama-34b"]["spec"]["template"]["spec"]
    fetch = next(c for c in pod["initContainers"] if c["name"] == "fetch-adapters")
    assert fetch["command"][-2:] == ["cf-team=org/cf-team-lora@abc123", "cf-ops=org/cf-ops-lora"]
    into = fetch["command"][fetch["command"].index("--adapters-into") + 1]
    (c,) = pod["containers"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts[into]["subPath"] == "codefleet-adapters" and mounts[into]["name"] == "model-cache"
    parsed = vllm_parse(c["args"])
    assert parsed["enable_lora"] and parsed["max_lora_rank"] == 16 and parsed["max_loras"] == 2
    assert [(m.name, m.path) for m in parsed["lora_modules"]] == [("cf-team", f"{into}/cf-team"),
                                                                  ("cf-ops", f"{into}/cf-ops")]
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in {e["name"] for e in c["env"]}
    (cm,) = [o for o in objs if o["kind"] == "ConfigMap" and "frontend.json" in o.get("data", {})]
    settings = FrontendConfig.model_validate_json(cm["data"]["frontend.json"]).settings(tmp_path)
    assert settings.adapters == {"cf-team": "codefuse-codellama-34b", "cf-ops": "codefuse-codellama-34b"}
    # other models have no init container for adapters
    other = engines(objs)["granite-3b-code-instruct-128k"]["spec"]["template"]["spec"]
    assert "fetch-adapters" not in [c["name"] for c in other.get("initContainers", [])]


def test_the_chart_refuses_an_adapter_from_this_machine(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text(
        '{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}')
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"")
    text = FLEET.read_text().replace("source: codefuse-ai/CodeFuse-CodeLlama-34B", "source: codefuse-ai/"
                                     "CodeFuse-CodeLlama-34B\n    adapters: [{name: cf-a, source: ./a}]", 1)
    (tmp_path / "fleet.yaml").write_text(text)
    loaded = load(tmp_path / "fleet.yaml")
    with pytest.raises(PlanError, match="the chart fetches adapters from the Hugging Face hub"):
        helm_values(loaded, plan_fleet(loaded, gpu="h100-80gb"))
