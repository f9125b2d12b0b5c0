"""The locks (deploy/lock/*.txt) pin a version of every requirement in pyproject.toml that satisfies it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
LOCKS = {"cpu": ("cpu", "router", "ray", "dev"), "gpu": ("gpu", "router", "ray"), "frontend": ("router",)}


def pins(lock: Path) -> dict[str, Version]:
    out = {}
    for m in re.finditer(r"^([A-Za-z0-9_.\-]+)==([^\s\\]+)", lock.read_text(), re.M):
        out[re.sub(r"[-_.]+", "-", m[1]).lower()] = Version(m[2])
    return out


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_lock_satisfies_pyproject(lock: str) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"]]
    for extra in LOCKS[lock]:
        wanted += [Requirement(r) for r in project["optional-dependencies"][extra]]
    pinned = pins(ROOT / "deploy" / "lock" / f"{lock}.txt")
    for req in wanted:
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pinned, f"{req.name} is not in deploy/lock/{lock}.txt: run `make lock`"
        assert req.specifier.contains(pinned[name], prereleases=True), \
            f"deploy/lock/{lock}.txt pins {req.name}=={pinned[name]}, pyproject wants {req.specifier}: run `make lock`"


def test_every_pin_has_a_hash() -> None:
    for lock in LOCKS:
        text = (ROOT / "deploy" / "lock" / f"{lock}.txt").read_text()
        for block in re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2]):
            if "==" in block.split("\n")[0]:
                assert "--hash=sha256:" in block, block.split("\n")[0]


def test_frontend_lock_carries_no_engine() -> None:
    """The frontend image (deploy/Dockerfile.frontend) is small because its lock has no vLLM, torch or CUDA."""
    pinned = pins(ROOT / "deploy" / "lock" / "frontend.txt")
    heavy = {n for n in pinned if n in ("vllm", "torch", "transformers", "ray", "triton") or n.startswith("nvidia-")}
    assert not heavy, heavy


def test_suffix_decoding_is_locked_and_built_everywhere() -> None:
    """arctic-inference (speculative method suffix) has no wheel on PyPI: its sdist's hash is locked
    by hand, its build requirements by `make lock`; `make install` and the GPU image build it."""
    lock = ROOT / "deploy" / "lock"
    assert pins(lock / "suffix.txt") == {"arctic-inference": Version("0.3.0")}
    assert set(pins(lock / "suffix-build.txt")) == {"nanobind", "cmake", "grpcio-tools", "wheel"}
    for name in ("suffix.txt", "suffix-build.txt"):
        text = (lock / name).read_text()
        blocks = [b for b in re.split(r"\n(?=[A-Za-z0-9])", text) if "==" in b.split("\n")[0]]
        assert blocks and all("--hash=sha256:" in b for b in blocks), name
    for installer in (ROOT / "Makefile", ROOT / "deploy" / "Dockerfile"):
        text = installer.read_text()
        assert "suffix-build.txt" in text and "--no-build-isolation" in text, installer
