"""One CLI for every stage: `python -m pipeline <stage> [--patch P --mask M] [--params FILE]`.

A user mistake (UserError) prints one line `maepipe: error: ...` and exits 2, never a traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

STAGES = ("data", "budget", "pretrain", "select", "pretrain_full", "probe", "finetune", "evaluate")
DATA_PARALLEL = ("pretrain", "pretrain_full", "probe", "finetune")  # the stages that may run under torchrun


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2, like ours
        self.exit(2, f"maepipe: error: {message}\n")


def _number(kind):
    def parse(text):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
    return parse


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=STAGES + ("preset", "validate"))
    parser.add_argument("name", nargs="?", help="preset name (for `preset`)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--marker", help="validate / budget: write this constant file when the check passes")
    parser.add_argument("--patch", type=_number(int), help="pretrain: the cell's patch size")
    parser.add_argument("--mask", type=_number(float), help="pretrain: the cell's mask ratio")
    parser.add_argument("--init", choices=("pretrained", "random"), default="pretrained",
                        help="probe / finetune: start from the selected MAE encoder or from random "
                             "weights (the controls `probe_random` and `scratch`)")
    args = parser.parse_args(argv)

    import signal

    from .errors import Terminated, UserError
    from .signals import install

    install()
    try:
        return _run(args)
    except UserError as e:
        print(f"maepipe: error: {e}", file=sys.stderr)
        return 2
    except Terminated:
        print("maepipe: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("maepipe: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        if args.stage in DATA_PARALLEL:
            from .engine import teardown

            teardown()


def _run(args) -> int:
    from . import params as params_mod
    from .errors import UserError

    if args.stage == "preset":
        from .presets import dvc_set_args

        print(" ".join(dvc_set_args(args.name)))
        return 0
    from . import dist

    if dist.world_size() > 1 and args.stage not in DATA_PARALLEL:
        raise UserError(f"stage {args.stage!r} runs in one process; only {', '.join(DATA_PARALLEL)} run "
                        f"data-parallel under torchrun")
    p = params_mod.load(args.params)
    if args.stage == "validate":
        from .engine import resolve_device

        resolve_device(p.device)  # `cuda` where there is none is a mistake too, found before any stage runs
        from .stages.budget import check_early

        check_early(p)
        if args.marker:
            # The DVC stage `validate`: every other stage depends on this file, whose content never
            # changes, so a valid edit re-runs only the stages whose own params changed, and an
            # invalid one stops `dvc repro` before DVC removes any other stage's outputs.
            from .fsutil import write_bytes

            write_bytes(Path(args.marker), b"params.yaml passed validation\n")
        print(f"{args.params}: ok ({len(p.cells())} grid cells)")
        return 0
    if args.stage == "budget":
        from .stages import budget

        budget.run(p, Path(args.marker or "data/budget.ok"))
        return 0
    if args.stage == "pretrain":
        if args.patch is None or args.mask is None:
            raise UserError("pretrain needs --patch and --mask (one grid cell)")
        from .stages import pretrain

        pretrain.run(p, args.patch, args.mask)
        return 0
    if args.stage in ("probe", "finetune"):
        import importlib

        importlib.import_module(f".stages.{args.stage}", __package__).run(p, args.init)
        return 0
    if args.init != "pretrained":
        raise UserError(f"--init applies to probe and finetune, not {args.stage}")
    import importlib

    importlib.import_module(f".stages.{args.stage}", __package__).run(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
