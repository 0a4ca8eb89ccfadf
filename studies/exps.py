"""Reading the files of named DVC experiments (their git refs under refs/exps) from a study."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def ref(name: str) -> str:
    """The commit of the newest DVC experiment called `name`."""
    refs = [
        line.split()
        for line in git(
            "for-each-ref", "--sort=-creatordate", "--format=%(objectname) %(refname)", "refs/exps"
        ).splitlines()
    ]
    found = [sha for sha, r in refs if r.rsplit("/", 1)[-1] == name]
    if not found:
        raise SystemExit(f"no DVC experiment named {name}: run it first (see the study's docstring)")
    return found[0]


def read_text(exp: str | None, rel: str) -> str:
    """`rel` in the workspace (exp None: the committed default run) or in experiment `exp`."""
    return (ROOT / rel).read_text() if exp is None else git("show", f"{ref(exp)}:{rel}")
