"""Git merge driver for dvc.lock: a three-way merge, stage by stage.

When machines split the grid (README "The grid across machines"), each branch's dvc.lock holds the
shared upstream stages and its own cells; git's line merge sees two different files, this driver
sees stages. Against the common ancestor, a stage that only one side changed (or added, or
deleted) takes that side's version; a stage both sides changed to the same entry is kept; a stage
both sides changed differently is a real conflict: the driver refuses and names it.

    git config merge.dvc-lock.driver "python tools/merge_dvc_lock.py %O %A %B"   # once per clone
    # .gitattributes (committed) routes dvc.lock to it
"""

from __future__ import annotations

import sys

import yaml


def merge(base: dict, ours: dict, theirs: dict) -> dict:
    """-> the merged lock; SystemExit naming the first stage both sides changed differently."""
    b, o, t = ((d or {}).get("stages") or {} for d in (base, ours, theirs))
    stages = {}
    for name in [*o, *(n for n in t if n not in o), *(n for n in b if n not in o and n not in t)]:
        was, mine, other = b.get(name), o.get(name), t.get(name)
        if mine == other:
            entry = mine
        elif mine == was:
            entry = other  # only theirs changed it (or added or deleted it)
        elif other == was:
            entry = mine
        else:
            raise SystemExit(
                f"dvc.lock: stage {name} changed differently on the two sides; run it again after the merge"
            )
        if entry is not None:
            stages[name] = entry
    schema = next((d.get("schema") for d in (ours, theirs, base) if d and d.get("schema")), None)
    return {"schema": schema, "stages": stages}


def _read(path: str) -> dict:
    with open(path) as f:
        return yaml.safe_load(f) or {}


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        raise SystemExit(__doc__)
    base_path, ours_path, theirs_path = argv
    merged = merge(_read(base_path), _read(ours_path), _read(theirs_path))
    with open(ours_path, "w") as f:
        yaml.safe_dump(merged, f, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
