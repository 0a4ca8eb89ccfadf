"""Stage `validate`: the whole params file, every value and every cross-field rule (checked when
`params.load` built `p`), plus what only this machine can tell: whether the device exists, and
whether the label budget fits the last prepared split.

Under DVC it writes a constant marker every other stage depends on: a valid edit rewrites the same
bytes, so only the stages whose own params changed re-run, and an invalid one stops `dvc repro`
before DVC removes any other stage's outputs."""

from pathlib import Path

from ..fsutil import write_bytes
from ..params import Params
from ..runtime import resolve_device
from .budget import check_early


def run(p: Params, marker: Path | None, source: str) -> None:
    resolve_device(p.device)
    check_early(p)
    if marker is not None:
        write_bytes(marker, b"params.yaml passed validation\n")
    print(f"{source}: ok ({len(p.cells())} grid cells)")
