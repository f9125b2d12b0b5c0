"""`codefleet smoke`'s own parts: its template renderer equals transformers', the template check
names what differs, and its arguments are refused with what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from codefleet.errors import CodefleetError
from codefleet.families import FAMILIES
from codefleet.router import first_key
from codefleet.smoke import Expect, _messages, parse_expect, render_chat, template_check
from tests.goldens import CONVERSATIONS, GOLDEN


@pytest.mark.parametrize(("family", "conversation", "gen"), sorted(GOLDEN))
def test_renderer_equals_transformers_goldens(family: str, conversation: str, gen: bool) -> None:
    """The frontend image has no transformers: smoke's renderer must agree with it on every golden
    (the goldens are transformers' renderings, tests/unit/test_templates.py)."""
    fam = FAMILIES[family]
    assert render_chat(fam.template_path().read_text(), CONVERSATIONS[conversation], fam, gen) == \
        GOLDEN[(family, conversation, gen)]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_is_recognised_and_told_apart(family: str) -> None:
    fam = FAMILIES[family]
    engine_prompt = render_chat(fam.template_path().read_text(), _messages(), fam)
    check, seen = template_check(engine_prompt, None)
    assert check.ok and seen is fam and family in check.detail
    check, seen = template_check(engine_prompt, Expect(family))
    assert check.ok and seen is fam
    for other in FAMILIES:
        if other != family:
            check, _ = template_check(engine_prompt, Expect(other))
            assert check.ok is False and f"the {other} family's template" in check.detail
            assert "first difference at character" in check.detail


def test_a_template_file_of_its_own_is_expected_exactly(tmp_path: Path) -> None:
    fam = FAMILIES["granite-code"]
    own = tmp_path / "own.jinja"
    own.write_text("{{ bos_token }}" + fam.template_path().read_text())
    prompt = render_chat(own.read_text(), _messages(), fam)
    assert template_check(prompt, Expect("granite-code", own))[0].ok
    check, _ = template_check(render_chat(fam.template_path().read_text(), _messages(), fam), Expect("granite-code", own))
    assert check.ok is False and "own.jinja" in check.detail
    assert template_check(None, None)[0].ok is False


def test_expect_arguments(tmp_path: Path) -> None:
    assert parse_expect("m=granite") == ("m", Expect("granite"))
    t = tmp_path / "t.jinja"
    t.write_text("x")
    assert parse_expect(f"m=chatml:{t}") == ("m", Expect("chatml", t))
    with pytest.raises(CodefleetError, match="unknown family 'granit'"):
        parse_expect("m=granit")
    with pytest.raises(CodefleetError, match="MODEL=FAMILY"):
        parse_expect("granite")
    with pytest.raises(CodefleetError, match="does not exist"):
        parse_expect(f"m=chatml:{tmp_path / 'no.jinja'}")


def test_first_key_of_a_key_file(tmp_path: Path) -> None:
    f = tmp_path / "keys"
    f.write_text("# keys\nteam-a:sha256:" + "0" * 64 + "\n\nteam-b:sk-b-0002\nsk-c\n")
    assert first_key(f) == "sk-b-0002"
    f.write_text("sk-bare-key\n")
    assert first_key(f) == "sk-bare-key"
    f.write_text("sha256:" + "1" * 64 + "\n")
    with pytest.raises(CodefleetError, match="digests only"):
        first_key(f)


def test_an_own_template_must_keep_the_familys_generation_prompt(tmp_path: Path) -> None:
    """A template of the model's own passes as long as it ends the prompt as the family does; another
    family's format under a custom name (a broken install) fails, naming the family's generation prompt."""
    granite = FAMILIES["granite"]
    chatml = FAMILIES["chatml"]
    wrong = tmp_path / "broken.jinja"
    wrong.write_text(chatml.template_path().read_text())
    prompt = render_chat(wrong.read_text(), _messages(), granite)
    check, _ = template_check(prompt, Expect("granite", wrong))
    assert check.ok is False and "'<|start_of_role|>assistant<|end_of_role|>'" in check.detail
