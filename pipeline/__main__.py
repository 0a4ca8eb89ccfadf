"""One CLI for every stage: `python -m pipeline <stage> [--patch P --mask M] [--params FILE]`.

A user mistake (UserError) prints one line `maepipe: error: ...` and exits 2, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

STAGES = ("validate", "data", "budget", "pretrain", "select", "pretrain_full", "probe", "finetune", "evaluate")
DATA_PARALLEL = ("pretrain", "pretrain_full", "probe", "finetune")  # the stages that may run under torchrun


def main(argv: list[str] | None = None) -> int:
    from .cli import Parser, guarded, number

    parser = Parser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=STAGES + ("preset",))
    parser.add_argument("name", nargs="?", help="preset name (for `preset`)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--marker", help="validate: write this constant file when the check passes")
    parser.add_argument("--patch", type=number(int), help="pretrain: the cell's patch size")
    parser.add_argument("--mask", type=number(float), help="pretrain: the cell's mask ratio")
    parser.add_argument("--rep", type=number(int), help="pretrain_full: the repetition (one of `repetitions`)")
    parser.add_argument(
        "--init",
        choices=("pretrained", "random"),
        default="pretrained",
        help="probe / finetune: start from the selected MAE encoder or from random "
        "weights (the controls `probe_random` and `scratch`)",
    )
    args = parser.parse_args(argv)
    try:
        return guarded(lambda: _run(args, sys.argv[1:] if argv is None else argv))
    finally:
        if args.stage in DATA_PARALLEL:
            import importlib

            importlib.import_module(".runtime", __package__).teardown()


def _preflight(argv: list[str]) -> None:
    """A tracking server that does not answer stops the stage before it computes anything. Under
    DVC, which removed this stage's outputs before running it, they are put back as dvc.lock
    records them, so the refusal changes nothing in the workspace."""
    import os

    from . import dist
    from .errors import UserError
    from .store import check_reachable, tracking_uri

    if not dist.is_main():
        return
    try:
        check_reachable(tracking_uri())
    except UserError:
        if os.environ.get("DVC_ROOT"):
            from .lockfile import restore_outputs

            restore_outputs(" ".join(["python", "-m", "pipeline", *argv]))
        raise


def _run(args, argv: list[str]) -> int:
    # Stage modules are imported by name, so the static import graph of this file holds only what
    # every stage needs: each stage's DVC code deps are this file's imports plus its own module's
    # (tools/codedeps.py derives them from that graph).
    import importlib

    from . import dist
    from . import params as params_mod
    from .errors import UserError

    if args.stage == "preset":
        print(" ".join(importlib.import_module(".presets", __package__).dvc_set_args(args.name)))
        return 0
    if dist.world_size() > 1 and args.stage not in DATA_PARALLEL:
        raise UserError(
            f"stage {args.stage!r} runs in one process; only {', '.join(DATA_PARALLEL)} run "
            f"data-parallel under torchrun"
        )
    if args.init != "pretrained" and args.stage not in ("probe", "finetune"):
        raise UserError(f"--init applies to probe and finetune, not {args.stage}")
    if args.stage == "pretrain" and (args.patch is None or args.mask is None):
        raise UserError("pretrain needs --patch and --mask (one grid cell)")
    p = params_mod.load(args.params)
    _preflight(argv)
    if args.stage == "pretrain_full" and args.rep not in p.repetitions:
        raise UserError(f"pretrain_full needs --rep, one of repetitions {list(p.repetitions)}; got {args.rep}")
    stage = importlib.import_module(f".stages.{args.stage}", __package__)
    if args.stage == "validate":
        stage.run(p, Path(args.marker) if args.marker else None, args.params)
    elif args.stage == "budget":
        stage.run(p, importlib.import_module(".stages", __package__).REPETITIONS)
    elif args.stage == "pretrain":
        stage.run(p, args.patch, args.mask)
    elif args.stage == "pretrain_full":
        stage.run(p, args.rep)
    elif args.stage in ("probe", "finetune"):
        stage.run(p, args.init)
    else:
        stage.run(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
