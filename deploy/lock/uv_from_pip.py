"""Print uv's index options for what pip is configured with here (pip.conf and PIP_* variables):
`make install` installs the lock with uv (parallel downloads and installs; the locked set took
pip about 4 minutes on a 2-core machine) and falls back to pip when uv cannot.

uv does not read pip's configuration, so the find-links folder (where the CPU build of torch may
be) and any extra or replaced index are passed on explicitly."""

from __future__ import annotations

import os
import subprocess
import sys


def pip_config(key: str) -> str:
    env = key.upper().replace("-", "_")
    if os.environ.get(f"PIP_{env}"):
        return os.environ[f"PIP_{env}"]
    for scope in ("global", "install"):
        out = subprocess.run([sys.executable, "-m", "pip", "config", "get", f"{scope}.{key}"],
                             capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    return ""


def main() -> None:
    args: list[str] = []
    if index := pip_config("index-url"):
        args += ["--default-index", index]
    for url in pip_config("extra-index-url").split():
        args += ["--index", url]
    for path in pip_config("find-links").split():
        args += ["--find-links", path]
    print(" ".join(args))


if __name__ == "__main__":
    main()
