"""``codefleet smoke BASE_URL``: a post-deploy check of every model behind one endpoint.

It talks to the endpoint as a client does (the official ``openai`` client) and works the same
against a local, Ray or Kubernetes deployment (the chart's ``helm test`` pod runs it). Per model:

* listed by ``GET /v1/models``; a model with no ready replica (``ready_replicas: 0``, e.g.
  autoscaled to zero) is skipped, not woken;
* chat and completion, streamed and not; streams carry ``usage`` when asked
  (``stream_options.include_usage``) and end with ``[DONE]``;
* the chat template: vLLM returns the prompt it rendered (``return_prompt_text``); it must equal
  the expected template rendered locally with the same messages, character for character. The
  expected template is the one the deployment claims (``--manifest``: the model's family or its
  ``chat_template`` file; ``--expect MODEL=FAMILY``); with no claim, the prompt must match one
  family's template exactly, and the report names which;
* stop tokens end generation: each of the family's stop tokens is forced as the first generated
  token (``allowed_token_ids``, not ``logit_bias``, which vLLM refuses on a speculating engine);
  the answer must finish with ``stop`` and an empty text; the id is the engine's (``return_token_ids``);
* a trained model's answer is not noise (``--manifest``: every model but the random-weight demo
  stand-ins): asked greedily for a small Python function, the answer must define it
  (``def add`` ... ``return``);
* a LoRA adapter (listed with a ``parent``) gets the same checks as a model, with its base model's
  template and stop tokens, except the trained-answer check (an adapter may change any answer);
* once per endpoint: an unknown model is answered 404.

Exit status: 0 when every check passed (skips allowed), 1 when one failed, 2 when the endpoint
could not be reached or the arguments are wrong.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import jinja2
import jinja2.ext
import openai
from jinja2.sandbox import ImmutableSandboxedEnvironment
from openai.types.chat import ChatCompletionMessageParam

from codefleet.errors import CodefleetError
from codefleet.families import FAMILIES, Family, get_family

SYSTEM = "You are a careful coding assistant."
USER = "Write a Python function that adds two integers. [codefleet smoke]"
PROMPT = "def add(a: int, b: int) -> int:\n"
#: A fill: the text before and after the cursor.
FILL_PREFIX = "def add(a: int, b: int) -> int:\n    return "
FILL_SUFFIX = "\n\n\nprint(add(1, 2))\n"
UNKNOWN_MODEL = "codefleet-smoke-no-such-model"
MAX_TOKENS = 8
SENSE_QUESTION = "Write a Python function named add that returns the sum of two numbers a and b."
SENSE_MAX_TOKENS = 96


@dataclass(frozen=True)
class Expect:
    """The template a model is supposed to apply: its family's, or a file of its own."""

    family: str
    template: Path | None = None
    #: The model is trained (not a random-weight stand-in): its answer must make sense.
    trained: bool = False

    def template_text(self) -> str:
        return (self.template or get_family(self.family).template_path()).read_text()


@dataclass
class Check:
    name: str
    #: True passed, False failed, None skipped.
    ok: bool | None
    detail: str = ""


@dataclass
class ModelReport:
    model: str
    checks: list[Check] = field(default_factory=list)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.ok is False]


def render_chat(template: str, messages: list[dict[str, Any]], family: Family, add_generation_prompt: bool = True) -> str:
    """The prompt a chat template makes, rendered as transformers' ``apply_chat_template`` does
    (sandboxed Jinja, trim_blocks, lstrip_blocks, loop controls, ``raise_exception``); the frontend
    image has no transformers. A unit test keeps the two equal on the goldens."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent,
                                                                                   ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, tools=None, documents=None,
        bos_token=family.bos_token or "", eos_token=family.eos_token)


def _messages() -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]


def generation_prompt(family: Family) -> str:
    """What the family's template adds for the assistant's turn (any own template of the family must end so)."""
    template = family.template_path().read_text()
    with_head = render_chat(template, _messages(), family, True)
    without = render_chat(template, _messages(), family, False)
    assert with_head.startswith(without)
    return with_head[len(without):]


def _chat_messages() -> list[ChatCompletionMessageParam]:
    return cast("list[ChatCompletionMessageParam]", _messages())


def _first_difference(a: str, b: str) -> str:
    i = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return f"first difference at character {i}: expected {a[max(0, i - 20):i + 30]!r}, engine {b[max(0, i - 20):i + 30]!r}"


def template_check(prompt_text: str | None, expect: Expect | None) -> tuple[Check, Family | None]:
    """Compare the engine's rendered prompt with the expected template's (or any family's)."""
    if prompt_text is None:
        return Check("template", False, "the answer has no prompt_text (the engine ignored return_prompt_text; "
                                        "is it vLLM >= 0.32 behind this endpoint?)"), None
    if expect is not None:
        family = get_family(expect.family)
        want = render_chat(expect.template_text(), _messages(), family)
        what = f"{expect.template.name}" if expect.template else f"the {family.name} family's template"
        if prompt_text == want:
            if expect.template is not None and not prompt_text.endswith(head := generation_prompt(family)):
                return Check("template", False, f"{what} is applied, but its prompt does not end with the "
                                                 f"{family.name} family's generation prompt {head!r} (the format the "
                                                 f"model was trained on): {prompt_text!r}"), family
            return Check("template", True, what), family
        return Check("template", False, f"the engine did not apply {what}: {_first_difference(want, prompt_text)}; "
                                         f"engine's prompt {prompt_text!r}"), family
    for family in FAMILIES.values():
        try:
            if render_chat(family.template_path().read_text(), _messages(), family) == prompt_text:
                return Check("template", True, f"{family.name} (recognised; no expectation given)"), family
        except jinja2.TemplateError:
            continue
    return Check("template", False, f"the engine's prompt matches no known family's template: {prompt_text!r}"), None


class Smoke:
    """The checks, against one endpoint."""

    def __init__(self, base_url: str, api_key: str | None, timeout: float = 120.0,
                 progress: Callable[[str], None] = lambda _: None) -> None:
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        # A couple of retries ride out a replica being replaced while the check runs (503/429).
        self.client = openai.OpenAI(base_url=self.base_url, api_key=api_key or "none", timeout=timeout,
                                    max_retries=2)
        self.progress = progress
        self.fim: dict[str, str | None] = {}
        """Per served model: its fill-in-the-middle format as /v1/models says (None: none)."""
        self.parent: dict[str, str] = {}
        """Per LoRA adapter: its base model, as /v1/models says."""

    def models(self) -> dict[str, int | None]:
        """Served models and their ready replicas (None when the endpoint does not say)."""
        out: dict[str, int | None] = {}
        for m in self.client.models.list():
            extra = m.model_extra or {}
            ready = extra.get("ready_replicas")
            out[m.id] = int(ready) if isinstance(ready, int) else None
            self.fim[m.id] = extra.get("fim") if isinstance(extra.get("fim"), str) else None
            if isinstance(extra.get("parent"), str):
                self.parent[m.id] = extra["parent"]
        return out

    def unknown_model(self) -> Check:
        try:
            self.client.with_options(max_retries=0).chat.completions.create(
                model=UNKNOWN_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
        except openai.NotFoundError:
            return Check("unknown model", True, "404")
        except openai.APIStatusError as exc:
            return Check("unknown model", False, f"expected 404, got {exc.status_code}: {exc.message}")
        return Check("unknown model", False, f"expected 404, the endpoint served model {UNKNOWN_MODEL!r}")

    def model(self, name: str, expect: Expect | None) -> ModelReport:
        report = ModelReport(name)
        family = get_family(expect.family) if expect else None
        try:
            chat, template, seen = self._chat(name, expect)
            report.checks += [chat, template]
            family = family or seen
        except openai.APIError as exc:
            report.checks.append(Check("chat", False, _api_error(exc)))
        for label, check in (("chat stream", self._chat_stream), ("completion", self._completion),
                             ("completion stream", self._completion_stream), ("fill", self._fill)):
            try:
                report.checks.append(check(name))
            except openai.APIError as exc:
                report.checks.append(Check(label, False, _api_error(exc)))
        if expect is not None and expect.trained:
            try:
                report.checks.append(self._sense(name))
            except openai.APIError as exc:
                report.checks.append(Check("answer makes sense", False, _api_error(exc)))
        if family is None:
            report.checks.append(Check("stop tokens", None, "no family known (template not recognised)"))
            return report
        for token in family.stop_tokens:
            try:
                report.checks.append(self._stop(name, token))
            except openai.APIError as exc:
                report.checks.append(Check(f"stop {token}", False, _api_error(exc)))
        return report

    def _chat(self, model: str, expect: Expect | None) -> tuple[Check, Check, Family | None]:
        r = self.client.chat.completions.create(model=model, messages=_chat_messages(),
                                                max_tokens=MAX_TOKENS, temperature=0,
                                                extra_body={"return_prompt_text": True})
        ok = bool(r.choices) and r.usage is not None and r.usage.completion_tokens > 0
        chat = Check("chat", ok, f"{r.usage.completion_tokens if r.usage else '?'} tokens, "
                                 f"finish {r.choices[0].finish_reason if r.choices else '?'}")
        template, family = template_check((r.model_extra or {}).get("prompt_text"), expect)
        return chat, template, family

    def _sense(self, model: str) -> Check:
        r = self.client.chat.completions.create(model=model, messages=[{"role": "user", "content": SENSE_QUESTION}],
                                                max_tokens=SENSE_MAX_TOKENS, temperature=0)
        text = r.choices[0].message.content or ""
        ok = "def add" in text and "return" in text
        return Check("answer makes sense", ok, "defines add()" if ok else f"no `def add ... return` in {text[:120]!r}")

    def _chat_stream(self, model: str) -> Check:
        stream = self.client.chat.completions.create(model=model, messages=_chat_messages(),
                                                     max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                                     stream_options={"include_usage": True})
        return _stream_check("chat stream", stream, lambda c: c.choices[0].delta.content if c.choices else None)

    def _completion(self, model: str) -> Check:
        r = self.client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
        ok = bool(r.choices) and r.usage is not None and r.usage.completion_tokens > 0
        return Check("completion", ok, f"{r.usage.completion_tokens if r.usage else '?'} tokens")

    def _completion_stream(self, model: str) -> Check:
        stream = self.client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                                stream=True, stream_options={"include_usage": True})
        return _stream_check("completion stream", stream, lambda c: c.choices[0].text if c.choices else None)

    def _fill(self, model: str) -> Check:
        """A fill (``suffix``) where /v1/models says the model takes one, else the 400 for it."""
        fim = self.fim.get(model)
        if fim is None:
            try:
                self.client.with_options(max_retries=0).completions.create(
                    model=model, prompt=FILL_PREFIX, suffix=FILL_SUFFIX, max_tokens=1)
            except openai.BadRequestError:
                return Check("fill refused", True, "400 (no fill-in-the-middle format)")
            return Check("fill refused", False, "the model has no fill format in /v1/models, but a suffix was served")
        plain = self.client.completions.create(model=model, prompt=FILL_PREFIX, max_tokens=1, temperature=0)
        r = self.client.completions.create(model=model, prompt=FILL_PREFIX, suffix=FILL_SUFFIX, max_tokens=MAX_TOKENS,
                                           temperature=0)
        # the rendered prompt holds the suffix and three markers besides the prefix
        ok = bool(r.usage and plain.usage and r.choices and r.usage.prompt_tokens >= plain.usage.prompt_tokens + 3)
        return Check(f"fill ({fim})", ok, f"prompt {r.usage.prompt_tokens if r.usage else '?'} tokens against "
                                         f"{plain.usage.prompt_tokens if plain.usage else '?'} without the suffix")

    def _stop(self, model: str, token: str) -> Check:
        name = f"stop {token}"
        r = self.client.completions.create(model=model, prompt=token, max_tokens=1,
                                           extra_body={"return_token_ids": True, "add_special_tokens": False})
        ids = (r.choices[0].model_extra or {}).get("prompt_token_ids") if r.choices else None
        if not ids or len(ids) != 1:
            return Check(name, False, f"the engine's tokenizer does not make {token!r} one token: {ids}")
        forced = self.client.chat.completions.create(
            model=model, messages=_chat_messages(), max_tokens=4, temperature=0,
            extra_body={"allowed_token_ids": [ids[0]]})
        choice = forced.choices[0]
        if choice.finish_reason == "stop" and not choice.message.content:
            return Check(name, True, f"token {ids[0]} ends the answer")
        return Check(name, False, f"with token {ids[0]} forced first, the answer went on: finish "
                                  f"{choice.finish_reason!r}, text {choice.message.content!r} (the engine does not "
                                  f"stop on it: stop_token_ids missing?)")


def _stream_check(name: str, stream: Any, text_of: Callable[[Any], str | None]) -> Check:
    pieces, usage, chunks = [], None, 0
    for chunk in stream:  # the SDK raises on an error event and returns at [DONE]
        chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage
        piece = text_of(chunk)
        if piece:
            pieces.append(piece)
    if usage is None:
        return Check(name, False, f"{chunks} chunks but no usage chunk (stream_options.include_usage was set)")
    if usage.completion_tokens <= 0:
        return Check(name, False, f"usage says {usage.completion_tokens} completion tokens")
    return Check(name, True, f"{chunks} chunks, usage {usage.prompt_tokens}+{usage.completion_tokens} tokens")


def _api_error(exc: openai.APIError) -> str:
    status = getattr(exc, "status_code", None)
    return f"{'HTTP ' + str(status) + ': ' if status else ''}{exc.message}"


def run(smoke: Smoke, expects: dict[str, Expect]) -> tuple[list[ModelReport], Check]:
    """Every check; raises CodefleetError when the endpoint cannot be reached at all."""
    try:
        served = smoke.models()
    except openai.APIConnectionError as exc:
        raise CodefleetError(f"cannot reach {smoke.base_url}: {exc.__cause__ or exc}") from None
    except openai.APIStatusError as exc:
        raise CodefleetError(f"{smoke.base_url}/models answered {exc.status_code}: {exc.message}") from None
    reports: list[ModelReport] = []
    for name in sorted(set(served) | set(expects)):
        if name not in served:
            reports.append(ModelReport(name, [Check("listed", False, f"not in /v1/models ({', '.join(served)})")]))
            continue
        if served[name] == 0:
            reports.append(ModelReport(name, [Check("listed", None, "skipped: 0 ready replicas (scaled to zero)")]))
            continue
        smoke.progress(f"checking {name} ...")
        started = time.monotonic()
        parent = smoke.parent.get(name)
        expect = expects.get(name)
        if expect is None and parent is not None and parent in expects:
            expect = replace(expects[parent], trained=False)
        report = smoke.model(name, expect)
        report.checks.insert(0, Check("listed", True, f"{served[name]} ready replica(s)" if served[name] else ""))
        if parent is not None:
            report.checks.insert(1, Check("adapter", True, f"LoRA adapter of {parent}"))
        smoke.progress(f"  {name}: {len(report.checks)} checks, {len(report.failed)} failed, "
                       f"{time.monotonic() - started:.1f} s")
        reports.append(report)
    return reports, smoke.unknown_model()


def format_report(base_url: str, reports: list[ModelReport], unknown: Check) -> str:
    lines = [f"codefleet smoke {base_url}: {len(reports)} model(s)"]
    for r in reports:
        status = "FAIL" if r.failed else ("skip" if all(c.ok is None for c in r.checks) else "ok")
        lines.append(f"  {status:<4} {r.model}")
        for c in r.checks:
            mark = {True: "ok", False: "FAIL", None: "skip"}[c.ok]
            lines.append(f"         {mark:<4} {c.name}{': ' + c.detail if c.detail else ''}")
    lines.append(f"  {'ok' if unknown.ok else 'FAIL':<4} unknown model answered {unknown.detail}")
    failed = sum(len(r.failed) for r in reports) + (unknown.ok is False)
    lines.append(f"{failed} check(s) failed" if failed else "all checks passed")
    return "\n".join(lines)


def report_json(reports: list[ModelReport], unknown: Check) -> str:
    return json.dumps({"models": [asdict(r) for r in reports], "unknown_model": asdict(unknown),
                       "failed": sum(len(r.failed) for r in reports) + (unknown.ok is False)}, indent=2)


def parse_expect(text: str) -> tuple[str, Expect]:
    """``MODEL=FAMILY`` or ``MODEL=FAMILY:TEMPLATE_FILE``."""
    model, sep, rest = text.partition("=")
    family, _, template = rest.partition(":")
    if not sep or not model or not family:
        raise CodefleetError(f"--expect {text!r}: write MODEL=FAMILY or MODEL=FAMILY:TEMPLATE_FILE")
    if family not in FAMILIES:
        raise CodefleetError(f"--expect {text!r}: unknown family {family!r}; known: {', '.join(FAMILIES)}")
    path = Path(template) if template else None
    if path is not None and not path.is_file():
        raise CodefleetError(f"--expect {text!r}: template file {path} does not exist")
    return model, Expect(family, path)


def expects_from_manifest(path: str | Path) -> dict[str, Expect]:
    from codefleet.demo_models import is_trained
    from codefleet.manifest import load
    from codefleet.resolve import resolve

    out: dict[str, Expect] = {}
    for m in resolve(load(path)):
        own = m.chat_template if m.chat_template != m.family.template_path() else None
        out[m.spec.name] = Expect(m.family.name, own, trained=m.demo is None or is_trained(m.demo))
        for a in m.spec.adapters:  # the base model's template and stop tokens; any answer
            out[a.name] = Expect(m.family.name, own, trained=False)
    return out
