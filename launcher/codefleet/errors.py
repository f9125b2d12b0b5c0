"""Errors raised by codefleet.

    CodefleetError            every error codefleet raises on purpose; the CLI prints it and exits 2
    ├── ManifestError         the manifest is wrong: names file, YAML path and line
    ├── PlanError             the manifest is valid but the fleet does not fit the hardware
    ├── DemoModelError        a tiny demo checkpoint could not be built
    ├── RuntimeStartError     an engine or the router did not become healthy; nothing is left running
    └── SecretError           the API keys the manifest names cannot be read
"""

from __future__ import annotations

from dataclasses import dataclass


class CodefleetError(Exception):
    """Base class of every error codefleet raises on purpose."""


@dataclass(frozen=True)
class Location:
    """Where in a manifest a problem is."""

    file: str
    path: str
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return f"{where}: {self.path}" if self.path else where


class ManifestError(CodefleetError):
    """One or more problems in a manifest, each with its location."""

    def __init__(self, problems: list[tuple[Location, str]]) -> None:
        self.problems = problems
        super().__init__("\n".join(f"{loc}: {msg}" for loc, msg in problems))


class PlanError(CodefleetError):
    """The manifest is valid, but a model cannot be placed as asked."""


class DemoModelError(CodefleetError):
    """A tiny demo checkpoint could not be built."""


class RuntimeStartError(CodefleetError):
    """An engine or the router did not come up; everything started was stopped."""


class SecretError(CodefleetError):
    """The API keys the manifest names (environment variable or file) cannot be read."""
