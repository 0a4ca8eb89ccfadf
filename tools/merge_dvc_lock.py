"""Git merge driver for dvc.lock: the union of the stages both sides ran.

When machines split the grid (README "The grid across machines"), each branch's dvc.lock holds the
shared upstream stages (identical on both) and its own cells; git's line merge sees two different
files, this driver sees disjoint stages. A stage both sides recorded differently is a real
conflict: the driver refuses and names it.

    git config merge.dvc-lock.driver "python tools/merge_dvc_lock.py %O %A %B"   # once per clone
    # .gitattributes (committed) routes dvc.lock to it
"""

from __future__ import annotations

import sys

import yaml


def merge(ours: dict, theirs: dict) -> dict:
    stages = dict(ours.get("stages") or {})
    for name, entry in (theirs.get("stages") or {}).items():
        if name in stages and stages[name] != entry:
            raise SystemExit(f"dvc.lock: stage {name} differs on the two sides; run it again after the merge")
        stages[name] = entry
    return {"schema": ours.get("schema") or theirs.get("schema"), "stages": stages}


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        raise SystemExit(__doc__)
    _, ours_path, theirs_path = argv
    with open(ours_path) as f:
        ours = yaml.safe_load(f) or {}
    with open(theirs_path) as f:
        theirs = yaml.safe_load(f) or {}
    merged = merge(ours, theirs)
    with open(ours_path, "w") as f:
        yaml.safe_dump(merged, f, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
