"""Speculative decoding without a draft model: the manifest's ``speculative:`` section, checked the
way vLLM 0.32 checks it, and rendered to its ``--speculative-config``.

Two methods propose tokens from what the request already holds, so they need no draft weights and
no draft KV cache:

- ``ngram``: prompt lookup, the last ``prompt_lookup_min..max`` tokens are looked up in the prompt
  and the output so far, and the tokens that followed are proposed (vllm/v1/spec_decode/
  ngram_proposer.py).
- ``suffix``: suffix decoding (Oliaro et al., arXiv:2411.04975), suffix trees over the prompt and
  earlier answers, from the ``arctic-inference`` package (vllm/v1/spec_decode/suffix_decoding.py).

vLLM's rules, from the installed vllm/config/speculative.py (0.32.0), repeated here so a manifest is
refused before anything starts, with the YAML line (vLLM's words for its own checks, pydantic's for
the ranges):

- ``num_speculative_tokens`` > 0; for ngram there is no default ("must be provided"), for suffix it
  defaults to ``suffix_decoding_max_tree_depth`` (a maximum: suffix proposes a variable number).
- ngram: ``prompt_lookup_max``/``_min`` >= 1; neither set: both 5; one set: the other equals it;
  then ``prompt_lookup_min <= prompt_lookup_max``.
- suffix: max_tree_depth >= 1 (24), max_cached_requests >= 0 (10000), max_spec_factor >= 0 (1.0),
  min_token_prob in [0, 1] (0.1); and ``import arctic_inference`` must work where the engine runs.
- Unknown keys are refused (vLLM's config is ``extra="forbid"``). codefleet also refuses a key of
  the other method, which vLLM would ignore silently.

With either method vLLM refuses requests that set ``min_p`` or ``logit_bias`` (400, vllm/
sampling_params.py "not yet supported with speculative decoding"); the resolver refuses a model whose
sampling defaults set ``min_p``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

NGRAM_KEYS = ("prompt_lookup_max", "prompt_lookup_min")
SUFFIX_KEYS = ("suffix_decoding_max_tree_depth", "suffix_decoding_max_cached_requests",
               "suffix_decoding_max_spec_factor", "suffix_decoding_min_token_prob")
#: vLLM's suffix defaults (vllm/config/speculative.py, SpeculativeConfig fields).
SUFFIX_DEFAULTS: dict[str, float] = {"suffix_decoding_max_tree_depth": 24, "suffix_decoding_max_cached_requests": 10000,
                                     "suffix_decoding_max_spec_factor": 1.0, "suffix_decoding_min_token_prob": 0.1}
#: vLLM's ngram default when neither lookup bound is set (speculative.py: "arbitrarily chosen").
NGRAM_DEFAULT_LOOKUP = 5
#: vLLM flags that carry the same setting; with ``speculative:`` they are decided by codefleet.
FLAGS = ("speculative_config", "spec_method", "spec_model", "spec_tokens")


class Speculative(BaseModel):
    """``speculative:`` of a model or of ``defaults``. ``false`` (or ``method: "off"``) turns it off."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["off", "ngram", "suffix"]
    num_speculative_tokens: int | None = Field(None, gt=0)
    """Draft tokens per step (ngram: required; suffix: the maximum, default its tree depth)."""
    prompt_lookup_max: int | None = Field(None, ge=1)
    prompt_lookup_min: int | None = Field(None, ge=1)
    suffix_decoding_max_tree_depth: int | None = Field(None, ge=1)
    suffix_decoding_max_cached_requests: int | None = Field(None, ge=0)
    suffix_decoding_max_spec_factor: float | None = Field(None, ge=0)
    suffix_decoding_min_token_prob: float | None = Field(None, ge=0, le=1)

    @model_validator(mode="before")
    @classmethod
    def _off(cls, data: Any) -> Any:
        # YAML 1.1 reads a bare `off` or `false` as False: `speculative: false`, `method: off`
        if data is False:
            return {"method": "off"}
        if isinstance(data, dict) and data.get("method") is False:
            return {**data, "method": "off"}
        return data

    @model_validator(mode="after")
    def _vllm_rules(self) -> Speculative:
        given = [k for k in (*NGRAM_KEYS, *SUFFIX_KEYS, "num_speculative_tokens") if getattr(self, k) is not None]
        if self.method == "off":
            if given:
                raise ValueError(f"method off takes no other keys (got {', '.join(given)})")
            return self
        other = SUFFIX_KEYS if self.method == "ngram" else NGRAM_KEYS
        if wrong := [k for k in other if getattr(self, k) is not None]:
            raise ValueError(f"{', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} not a key of method "
                             f"{self.method} (its keys: num_speculative_tokens, "
                             f"{', '.join(NGRAM_KEYS if self.method == 'ngram' else SUFFIX_KEYS)})")
        if self.method == "ngram":
            if self.num_speculative_tokens is None:
                raise ValueError("num_speculative_tokens must be provided with method ngram (vLLM has no default "
                                 "for it; 4 is a common start, `codefleet tune` measures)")
            lo, hi = self.lookup
            if lo > hi:
                raise ValueError(f"prompt_lookup_min={lo} must be <= prompt_lookup_max={hi}")
        return self

    @property
    def on(self) -> bool:
        return self.method != "off"

    @property
    def lookup(self) -> tuple[int, int]:
        """ngram's (min, max) as vLLM fills them in."""
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if lo is None and hi is None:
            return NGRAM_DEFAULT_LOOKUP, NGRAM_DEFAULT_LOOKUP
        return (lo if lo is not None else hi), (hi if hi is not None else lo)  # type: ignore[return-value]

    @property
    def tokens(self) -> int:
        """Draft tokens per step at most (0: off)."""
        if not self.on:
            return 0
        if self.num_speculative_tokens is not None:
            return self.num_speculative_tokens
        return int(self.suffix_decoding_max_tree_depth or SUFFIX_DEFAULTS["suffix_decoding_max_tree_depth"])

    def vllm_config(self) -> dict[str, Any] | None:
        """vLLM's ``--speculative-config`` (every value spelled out, so a plan shows what runs)."""
        if not self.on:
            return None
        out: dict[str, Any] = {"method": self.method, "num_speculative_tokens": self.tokens}
        if self.method == "ngram":
            out["prompt_lookup_min"], out["prompt_lookup_max"] = self.lookup
        else:
            for key, default in SUFFIX_DEFAULTS.items():
                value = getattr(self, key)
                out[key] = value if value is not None else type(default)(default)
        return out

    def describe(self) -> str:
        cfg = self.vllm_config()
        if cfg is None:
            return "off"
        return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in cfg.items())


def suffix_available() -> bool:
    """Whether the suffix tree vLLM imports (vllm/v1/spec_decode/suffix_decoding.py) loads here:
    stricter than vLLM's has_arctic_inference (the top-level module is found), which would pass a
    package whose compiled part is missing."""
    if importlib.util.find_spec("arctic_inference") is None:
        return False
    try:
        importlib.import_module("arctic_inference.suffix_decoding")
    except ImportError:
        return False
    return True


def problems(sp: Speculative, *, on_cpu: bool, sampling: dict[str, Any], model_dir: Path | None,
             engine_args: dict[str, Any]) -> list[str]:
    """What would make vLLM refuse the engine, or every request, with ``sp`` on (empty: fine)."""
    out = []
    if sp.method == "suffix" and on_cpu and not suffix_available():
        out.append("method suffix needs the arctic-inference package where the engine runs (vLLM: \"Arctic "
                   "Inference is required for suffix decoding\"), and it does not import here; use method ngram, "
                   "or install it (`make install` builds it: docs/install.md)")
    defaults = dict(sampling)
    gen_config = model_dir / "generation_config.json" if model_dir is not None else None
    if gen_config is not None and gen_config.is_file():
        try:
            found = json.loads(gen_config.read_text())
        except (OSError, ValueError):
            found = None
        if isinstance(found, dict):
            defaults = {**found, **defaults}
    if float(defaults.get("min_p", 0) or 0) > 0:
        out.append(f"the model's sampling defaults set min_p {defaults['min_p']} (card or generation_config.json), and "
                   "vLLM refuses min_p with speculative decoding (vllm/sampling_params.py): every request would get 400")
    args = {k.lstrip("-").replace("-", "_"): v for k, v in engine_args.items()}
    if args.get("async_scheduling") is True:
        out.append(f"engine_args.async_scheduling true: vLLM refuses async scheduling with {sp.method} speculation "
                   "(vllm/config/vllm.py: only EAGLE/MTP/draft-model/ngram_gpu kinds)")
    if args.get("enable_lora") and args.get("max_num_batched_tokens") and args.get("max_num_seqs"):
        need = step_tokens(int(args["max_num_seqs"]), sp.tokens)
        if int(args["max_num_batched_tokens"]) < need:
            out.append(f"with LoRA vLLM refuses max_num_batched_tokens {args['max_num_batched_tokens']} below max_num_seqs "
                       f"x (1 + num_speculative_tokens) = {need} (vllm/engine/arg_utils.py)")
    return out


def step_tokens(max_num_seqs: int, tokens: int) -> int:
    """Tokens one decode step schedules when every running sequence carries a full draft: 1 + k
    each (vllm/v1/core/sched/scheduler.py budgets ``num_new_tokens + draft`` per request)."""
    return max_num_seqs * (1 + tokens)


def ngram_warmup_bytes(max_model_len: int) -> int:
    """Host memory ngram's numba warm-up allocates once at start: np.zeros((1024, max_model_len),
    int32) (vllm/v1/spec_decode/ngram_proposer.py)."""
    return 1024 * max_model_len * 4
