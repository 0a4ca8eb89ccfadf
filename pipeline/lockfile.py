"""What `dvc.lock` recorded for a stage, and putting its outputs back.

DVC removes a stage's outputs before it runs the stage's command. A stage that must refuse to run
for a reason that is no user's edit (the tracking server is down) puts them back as the lock
records them, from DVC's cache (DVC 3 keeps even `cache: false` outputs there once a stage has
run on this machine), so the refusal changes nothing: `git status` and `dvc status` read as
before the run."""

from __future__ import annotations

import configparser
import json
import shutil
from pathlib import Path

import yaml


def _cache_dir() -> Path:
    """The DVC cache this workspace uses (a queued or temporary experiment's is the repo's)."""
    found = Path(".dvc") / "cache"
    for name in ("config", "config.local"):
        config = configparser.ConfigParser()
        config.read(Path(".dvc") / name)
        if config.has_option("cache", "dir"):
            found = Path(".dvc") / config.get("cache", "dir")  # an absolute dir replaces the prefix
    return found


def _cached(cache: Path, md5: str) -> Path:
    return cache / "files" / "md5" / md5[:2] / md5[2:]


def restore_outputs(cmd: str) -> list[str]:
    """Put back the outputs dvc.lock records for the stage whose command is `cmd`; -> the paths
    restored (none when the stage never ran, or its files are not in this machine's cache)."""
    try:
        lock = yaml.safe_load(Path("dvc.lock").read_text()) or {}
    except OSError:
        return []
    stage = next((s for s in (lock.get("stages") or {}).values() if s.get("cmd") == cmd), None)
    if stage is None:
        return []
    cache, restored = _cache_dir(), []
    for out in stage.get("outs", []):
        path, md5 = Path(out["path"]), out.get("md5", "")
        files = [(path, md5)]
        if md5.endswith(".dir"):
            manifest = _cached(cache, md5)
            if not manifest.is_file():
                continue
            files = [(path / e["relpath"], e["md5"]) for e in json.loads(manifest.read_text())]
        for target, digest in files:
            source = _cached(cache, digest)
            if source.is_file() and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
                restored.append(str(target))
    return restored
