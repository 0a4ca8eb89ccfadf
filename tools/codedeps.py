"""The code deps of every DVC stage, derived from the import graph instead of kept by hand.

A stage `python -m pipeline <stage>` runs `pipeline/__main__.py` and the module
`pipeline/stages/<stage>.py`; its code deps are those two files, `pipeline/__init__.py`, and every
`pipeline` module either of them imports, directly or through other modules, at module level or
inside a function (a lazy import still runs). `__main__` imports stage modules by name, so its own
graph is only what every stage needs.

    python tools/codedeps.py          # exit 1 and list the differences when dvc.yaml is stale
    python tools/codedeps.py --write  # rewrite the pipeline/*.py deps of every stage in dvc.yaml
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "pipeline"
CMD = re.compile(r"python -m pipeline (\w+)")


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """`pipeline.stages.arm` -> pipeline/stages/arm.py (or a package's __init__.py); None if absent."""
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path = ROOT) -> set[str]:
    """The `pipeline` modules that the file at `path` imports anywhere in its body."""
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            # `from . import stats` imports a module; `from .params import Params` a name.
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m.split(".")[0] == PACKAGE and module_file(m, root)}


def closure(start: list[str], root: Path = ROOT) -> set[str]:
    """Every module reachable from `start`, with the packages each one lives in (importing
    `pipeline.stages.arm` runs `pipeline/__init__.py` and `pipeline/stages/__init__.py`)."""
    seen: set[str] = set()
    todo = list(start)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        todo.extend(imports(module_file(name, root), root))
    return seen


def stage_deps(stage: str, root: Path = ROOT) -> list[str]:
    """The pipeline/*.py files `python -m pipeline <stage>` may execute, sorted."""
    mods = closure([f"{PACKAGE}.__main__", f"{PACKAGE}.stages.{stage}"], root)
    return sorted(str(module_file(m, root).relative_to(root)) for m in mods)


def _blocks(text: str):
    """(name, start, end) of each stage's block in dvc.yaml's text."""
    heads = [(m.group(1), m.start()) for m in re.finditer(r"^  (\w+):\n", text, re.M)]
    stop = text.find("\nplots:")
    for i, (name, start) in enumerate(heads):
        end = heads[i + 1][1] if i + 1 < len(heads) else (stop if stop > start else len(text))
        yield name, start, end


def expected(dvc_yaml: Path = ROOT / "dvc.yaml") -> dict[str, list[str]]:
    out = {}
    for name, start, end in _blocks(dvc_yaml.read_text()):
        cmd = CMD.search(dvc_yaml.read_text()[start:end])
        if cmd:
            out[name] = stage_deps(cmd.group(1), dvc_yaml.parent)
    return out


def listed(dvc_yaml: Path = ROOT / "dvc.yaml") -> dict[str, list[str]]:
    text = dvc_yaml.read_text()
    return {
        name: re.findall(r"^\s+- (pipeline/\S+\.py)$", text[start:end], re.M)
        for name, start, end in _blocks(text)
        if CMD.search(text[start:end])
    }


def differences(dvc_yaml: Path = ROOT / "dvc.yaml") -> dict[str, dict[str, list[str]]]:
    want, have = expected(dvc_yaml), listed(dvc_yaml)
    diff = {}
    for stage in want:
        missing = sorted(set(want[stage]) - set(have[stage]))
        extra = sorted(set(have[stage]) - set(want[stage]))
        if missing or extra:
            diff[stage] = {"missing": missing, "extra": extra}
    return diff


def write(dvc_yaml: Path = ROOT / "dvc.yaml") -> None:
    """Replace each stage's run of `- pipeline/...py` lines with the derived list, in place."""
    text = dvc_yaml.read_text()
    want = expected(dvc_yaml)
    pieces, pos = [], 0
    for name, start, end in _blocks(text):
        if name not in want:
            continue
        block = text[start:end]
        lines = list(re.finditer(r"^(\s+)- pipeline/\S+\.py\n", block, re.M))
        if not lines:
            raise SystemExit(f"dvc.yaml: stage {name} lists no pipeline/*.py deps; add one to place the list")
        indent = lines[0].group(1)
        new = "".join(f"{indent}- {f}\n" for f in want[name])
        first, last = lines[0].start(), lines[-1].end()
        kept = re.sub(r"^\s+- pipeline/\S+\.py\n", "", block[first:last], flags=re.M)
        pieces += [text[pos : start + first], kept, new]
        pos = start + last
    dvc_yaml.write_text("".join(pieces) + text[pos:])


def main(argv: list[str]) -> int:
    if argv == ["--write"]:
        write()
        return 0
    if argv:
        raise SystemExit(__doc__)
    diff = differences()
    for stage, d in diff.items():
        for f in d["missing"]:
            print(f"dvc.yaml: stage {stage} imports {f} but does not list it in deps")
        for f in d["extra"]:
            print(f"dvc.yaml: stage {stage} lists {f} in deps but never imports it")
    if diff:
        print("run `python tools/codedeps.py --write` to fix")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
