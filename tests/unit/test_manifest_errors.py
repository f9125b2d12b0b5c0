"""A corpus of broken manifests: each names the problem, the YAML path and the line."""

from __future__ import annotations

from pathlib import Path

import pytest

from codefleet.errors import ManifestError
from codefleet.manifest import parse
from codefleet.resolve import resolve

OK_MODEL = """\
  - name: cf
    source: codefuse-ai/CodeFuse-CodeLlama-34B
"""

# (id, manifest text, YAML path, line, words in the message)
CORPUS: list[tuple[str, str, str, int | None, list[str]]] = [
    ("misspelled-model-key",
     "models:\n  - name: a\n    source: codefuse-ai/CodeFuse-CodeLlama-34B\n    tensor_paralel_size: 2\n",
     "models[0].tensor_paralel_size", 4, ["unknown key 'tensor_paralel_size'", "did you mean 'tensor_parallel_size'"]),
    ("misspelled-top-key", "modles: []\n" + "models:\n" + OK_MODEL,
     "modles", 1, ["did you mean 'models'"]),
    ("misspelled-router-key", "router:\n  prot: 8000\nmodels:\n" + OK_MODEL,
     "router.prot", 2, ["did you mean 'port'"]),
    ("unknown-family",
     "models:\n  - name: a\n    source: codefuse-ai/CodeFuse-CodeLlama-34B\n    family: llama2\n",
     "models[0].family", 4, ["unknown family 'llama2'", "granite-code", "codefuse"]),
    ("family-near-miss",
     "models:\n  - name: a\n    source: codefuse-ai/CodeFuse-CodeLlama-34B\n    family: granitecode\n",
     "models[0].family", 4, ["did you mean 'granite-code'"]),
    ("tp-does-not-divide-heads",
     "models:\n  - name: a\n    source: codefuse-ai/CodeFuse-CodeLlama-34B\n    tensor_parallel_size: 3\n",
     "models[0].tensor_parallel_size", 4, ["the 64 attention heads do not divide by 3", "valid values: 1, 2, 4, 8, 16"]),
    ("tp-starcoder-heads",
     "models:\n  - name: a\n    source: GeorgiaTechResearchInstitute/starcoder-gpteacher-code-instruct\n"
     "    tensor_parallel_size: 5\n",
     "models[0].tensor_parallel_size", 4, ["48 attention heads", "valid values: 1, 2, 3, 4, 6, 8, 12, 16, 24, 48"]),
    ("tp-zero", "models:\n  - name: a\n    source: codefuse-ai/CodeFuse-CodeLlama-34B\n    tensor_parallel_size: 0\n",
     "models[0].tensor_parallel_size", 4, ["greater than or equal to 1"]),
    ("replicas-not-int", "models:\n  - name: a\n    source: codefuse-ai/CodeFuse-CodeLlama-34B\n    replicas: two\n",
     "models[0].replicas", 4, ["valid integer", "'two'"]),
    ("bad-dtype", "models:\n  - name: a\n    source: codefuse-ai/CodeFuse-CodeLlama-34B\n    dtype: fp8\n",
     "models[0].dtype", 4, ["'auto', 'bfloat16', 'float16' or 'float32'", "'fp8'"]),
    ("max-len-too-long",
     "models:\n  - name: a\n    source: ibm-granite/granite-3.0-1b-a400m-instruct\n    max_model_len: 8192\n",
     "models[0].max_model_len", 4, ["longer than the model's 4096 positions"]),
    ("unknown-gpu", "defaults:\n  gpu: v100\nmodels:\n" + OK_MODEL,
     "defaults.gpu", 2, ["unknown GPU type 'v100'", "h100-80gb"]),
    ("unknown-source", "models:\n  - name: a\n    source: codefuse-ai/CodeFuse-CodeLlama-13B\n",
     "models[0].source", 3, ["not in the catalog", "Did you mean 'codefuse-ai/CodeFuse-CodeLlama-34B'"]),
    ("missing-source", "models:\n  - name: a\n", "models[0].source", 2, ["required field is missing"]),
    ("missing-models", "defaults:\n  gpu: h100-80gb\n", "models", 1, ["required field is missing"]),
    ("empty-models", "models: []\n", "models", 1, ["at least 1 item"]),
    ("duplicate-name", "models:\n" + OK_MODEL + OK_MODEL, "models[1].name", 4, ["already used by models[0]"]),
    ("duplicate-key", "models:\n  - name: a\n    name: b\n    source: x\n", "models[0].name", 3, ["duplicate key 'name'"]),
    ("decided-engine-arg",
     "models:\n  - name: a\n    source: codefuse-ai/CodeFuse-CodeLlama-34B\n    engine_args:\n      max-model-len: 100\n",
     "models[0].engine_args.max-model-len", 5, ["decided by codefleet", "'max_model_len'"]),
    ("bad-yaml", "models:\n  - name: a\n   source: [\n", "", 3, ["not valid YAML"]),
    ("not-a-mapping", "- a\n- b\n", "", 1, ["YAML mapping"]),
    ("bad-policy", "router:\n  policy: fastest\nmodels:\n" + OK_MODEL, "router.policy", 2, ["'cache_aware'", "'fastest'"]),
    ("api-keys-in-clear", "router:\n  api_keys:\n    keys: [sk-1]\nmodels:\n" + OK_MODEL,
     "router.api_keys.keys", 3, ["unknown key 'keys'", "valid keys here: env, file"]),
    ("api-keys-none", "router:\n  api_keys: {}\nmodels:\n" + OK_MODEL,
     "router.api_keys", 2, ["set exactly one of env or file"]),
    ("family-needed", "models:\n  - name: a\n    source: ./local-model\n", "models[0].source", 3, ["has no config.json"]),
    ("missing-template",
     "models:\n  - name: a\n    source: codefuse-ai/CodeFuse-CodeLlama-34B\n    chat_template: nope.jinja\n",
     "models[0].chat_template", 4, ["nope.jinja does not exist"]),
    ("bad-name", "models:\n  - name: 'my model'\n    source: codefuse-ai/CodeFuse-CodeLlama-34B\n",
     "models[0].name", 2, ["should match pattern"]),
    ("unknown-demo", "models:\n  - name: a\n    source: demo://gpt2\n", "models[0].source", 3, ["unknown demo model", "demo://codefuse"]),
    # An unknown key whose value is a mapping still lists the keys valid where it stands.
    ("unknown-mapping-in-model", "models:\n" + OK_MODEL + "    scaling: {min_replicas: 0}\n",
     "models[0].scaling", 4, ["unknown key 'scaling'", "valid keys here: name, source,"]),
    ("unknown-mapping-in-defaults", "defaults:\n  autoscaling:\n    min_replicas: 0\nmodels:\n" + OK_MODEL,
     "defaults.autoscaling", 2, ["unknown key 'autoscaling'", "valid keys here: gpu, gpus_per_node,"]),
    ("unknown-mapping-at-top", "scaling: {a: 1}\nmodels:\n" + OK_MODEL,
     "scaling", 1, ["unknown key 'scaling'", "valid keys here: version, capacity, defaults,"]),
    ("autoscaling-min-above-max",
     "models:\n  - name: a\n    source: codefuse-ai/CodeFuse-CodeLlama-34B\n    autoscaling:\n"
     "      min_replicas: 3\n      max_replicas: 2\n",
     "models[0].autoscaling", 4, ["min_replicas 3 is above max_replicas 2"]),
    ("autoscaling-replicas-out-of-range",
     "models:\n  - name: a\n    source: codefuse-ai/CodeFuse-CodeLlama-34B\n    replicas: 5\n"
     "    autoscaling: {min_replicas: 0, max_replicas: 2}\n",
     "models[0]", 2, ["replicas 5 (the starting count)", "min_replicas 0 .. max_replicas 2"]),
    ("autoscaling-bad-signal",
     "models:\n  - name: a\n    source: codefuse-ai/CodeFuse-CodeLlama-34B\n    autoscaling:\n"
     "      max_replicas: 2\n      signal: queue\n",
     "models[0].autoscaling.signal", 6, ["'waiting', 'kv_cache' or 'ttft'", "'queue'"]),
    ("autoscaling-kv-target-above-one",
     "models:\n  - name: a\n    source: codefuse-ai/CodeFuse-CodeLlama-34B\n    autoscaling:\n"
     "      max_replicas: 2\n      signal: kv_cache\n      target: 70\n",
     "models[0].autoscaling", 4, ["kv_cache usage is a fraction"]),
    ("tenant-unknown-model",
     "router: {api_keys: {env: K}}\ntenants:\n  ide:\n    models: [cf, codefuse]\nmodels:\n" + OK_MODEL,
     "tenants.ide.models[1]", 4, ["unknown model 'codefuse'", "served models: cf"]),
    ("tenants-without-keys", "tenants:\n  ide: {requests_per_minute: 10}\nmodels:\n" + OK_MODEL,
     "tenants", 1, ["tenants need router.api_keys"]),
    ("tenant-bad-limit", "router: {api_keys: {env: K}}\ntenants:\n  ide: {requests_per_minute: 0}\nmodels:\n" + OK_MODEL,
     "tenants.ide.requests_per_minute", 3, ["greater than or equal to 1"]),
    ("tenant-bad-name", "router: {api_keys: {env: K}}\ntenants:\n  'team a': {}\nmodels:\n" + OK_MODEL,
     "tenants.team a", 3, ["tenant name 'team a'"]),
    ("autoscaling-no-max",
     "models:\n  - name: a\n    source: codefuse-ai/CodeFuse-CodeLlama-34B\n    autoscaling: {min_replicas: 0}\n",
     "models[0].autoscaling.max_replicas", 4, ["required field is missing"]),
]


@pytest.mark.parametrize(("text", "path", "line", "words"), [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS])
def test_broken_manifest(tmp_path: Path, text: str, path: str, line: int | None, words: list[str]) -> None:
    file = tmp_path / "fleet.yaml"
    file.write_text(text)
    with pytest.raises(ManifestError) as info:
        resolve(parse(text, file))
    locations = [(loc.path, loc.line) for loc, _ in info.value.problems]
    assert (path, line) in locations, info.value
    message = str(info.value)
    assert str(file) in message
    for word in words:
        assert word in message, message


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 15


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    text = ("models:\n  - name: a\n    source: codefuse-ai/CodeFuse-CodeLlama-34B\n    tensor_parallel_size: 3\n"
            "  - name: b\n    source: codefuse-ai/CodeFuse-CodeLlama-34B\n    family: nope\n")
    with pytest.raises(ManifestError) as info:
        resolve(parse(text, tmp_path / "m.yaml"))
    assert [(loc.path, loc.line) for loc, _ in info.value.problems] == [
        ("models[0].tensor_parallel_size", 4), ("models[1].family", 7)]


def test_shipped_manifests_are_valid() -> None:
    root = Path(__file__).resolve().parents[2] / "deploy" / "manifests"
    for name, count in (("fleet.yaml", 5), ("demo-cpu.yaml", 6)):  # the demo adds the trained model
        text = (root / name).read_text()
        models = resolve(parse(text, root / name))
        assert len(models) == count
