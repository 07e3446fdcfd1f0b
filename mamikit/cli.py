"""Headless entry points: `python -m mamikit <command> ...`.

Each command is a thin wrapper around a library function; the parsers live
here so that `--help` stays fast (heavy modules are imported only when a
command runs).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from .profiles import PROFILE_NAMES
from .settings import add_setting_options
from .utils import MamikitError, set_message_prefix

# command -> (module, function); the function takes the parsed arguments and
# returns an exit code (None means 0).
COMMANDS = {
    "synth": ("mamikit.synthetic", "cli_synth"),
    "check": ("mamikit.data", "cli_check"),
    "score": ("mamikit.metrics", "cli_score"),
    "extract": ("mamikit.extraction", "cli_extract"),
    "train": ("mamikit.train", "cli_train"),
    "round": ("mamikit.rounds", "cli_round"),
    "report": ("mamikit.analysis", "cli_report"),
    "predict": ("mamikit.predict", "cli_predict"),
    "demo": ("mamikit.notebooks", "cli_demo"),
    "strip-notebooks": ("mamikit.notebooks", "cli_strip"),
}


def _backbone_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clip-model", help="override the profile's open_clip model name")
    p.add_argument("--clip-pretrained", help="override the open_clip weights tag or give a local checkpoint file")
    p.add_argument("--detr-model", help="override the DETR hub name or give a local directory")
    p.add_argument("--text-model", help="override the text model hub name or give a local directory")


def _profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="demo", choices=PROFILE_NAMES, help="backbones and sizes (default: demo)")
    _backbone_args(p)
    p.add_argument("--weights", choices=["pretrained", "random"], default="pretrained",
                   help="random: the profile's architectures with seeded random weights, nothing downloaded "
                        "(default: pretrained)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="python -m mamikit", description="mamikit: multi-modal meme classification (SemEval-2022 Task 5).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("synth", help="write a synthetic MAMI + FBHM meme set in the official layouts")
    p.add_argument("--out", required=True, help="output data folder")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--mami", type=int, default=None, help="MAMI training memes")
    p.add_argument("--mami-test", type=int, default=None, help="MAMI test memes")
    p.add_argument("--fbhm", type=int, default=None, help="FBHM memes")

    p = sub.add_parser("check", help="validate a data folder without extracting; exit 1 on problems")
    p.add_argument("--data", required=True, help="data folder holding MAMI/ and/or FBHM/")

    p = sub.add_parser("score", help="score an answer file against the gold labels like the official scorer")
    p.add_argument("truth", help="gold file (test_labels.txt layout)")
    p.add_argument("answer", help="answer file (file_name + 1 or 5 columns)")

    p = sub.add_parser("extract", help="run the frozen backbones and fill a resumable feature store")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="feature store folder")
    _profile_args(p)
    p.add_argument("--backbones", default="clip,detr,text", help="comma-separated subset of clip,detr,text")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--split-seed", type=int, default=0, help="seed of the 80/20 train/dev split")
    p.add_argument("--chunk-rows", type=int, default=256, help="memes per resumable chunk (smaller: less lost when killed)")

    # train and round: one option per Settings / TrainConfig field (mamikit.settings.add_setting_options)
    p = sub.add_parser("train", help="train one experiment into a run directory")
    p.add_argument("--experiment", required=True, help="paper experiment name: 00 01 02 03 10 12 13 20 21 30")
    p.add_argument("--out", required=True, help="run directory (e.g. runs/round1/02-seed0)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    add_setting_options(p, exclude=("seeds", "run_root"))
    _backbone_args(p)

    p = sub.add_parser("round", help="run every experiment of one of the paper's rounds (skips complete runs)")
    p.add_argument("--round", required=True, type=int, choices=[1, 2, 3, 4])
    p.add_argument("--out", help="runs root; runs land in OUT/round<N>/<exp>-seed<k> (default: the settings' runs "
                                 "folder, <run_root>/runs)")
    p.add_argument("--rerun-changed", action="store_true",
                   help="train again (replacing them) the runs of this round recorded with other settings")
    p.add_argument("--single-stage", action="store_true",
                   help="round 4: experiment 30 as one 30-epoch schedule instead of 15 epochs continued for 15 "
                        "(docs/fidelity.md row 3)")
    p.add_argument("--shard", metavar="K/N", help="only worker K's share of the runs out of N workers (K = 0..N-1)")
    p.add_argument("--list", action="store_true", help="print the runs this worker would do and their state; "
                                                       "train nothing")
    p.add_argument("--engine", default="sequential", choices=["sequential", "ray"],
                   help="one run after another, or each run a Ray task")
    p.add_argument("--address", help="Ray cluster to join (default: start a local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    add_setting_options(p, exclude=("seed", "init_from", "run_root"))
    _backbone_args(p)

    p = sub.add_parser("report", help="tables 2-5, Tukey and box plots, t-SNE and attention figures from runs")
    p.add_argument("runs", help="runs root")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--data", help="data folder (for figures 3-4; default: from the run config)")
    p.add_argument("--features", help="feature store (for figures 3-4; default: from the run config)")

    p = sub.add_parser("predict", help="classify one meme with a trained run")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--image", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser("demo", help="run notebooks 01-09 headless on the demo profile")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--small", action="store_true", help="smallest settings (used by the tests)")

    p = sub.add_parser("strip-notebooks", help="remove outputs from notebooks before commit")
    p.add_argument("paths", nargs="+")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the command, and turn user errors into one-line messages."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    module, func = COMMANDS[args.command]

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        # a warning is one line naming the command, not two lines pointing into mamikit's source
        print(f"mamikit {args.command}: warning: {message}", file=sys.stderr)

    set_message_prefix(f"mamikit {args.command}: ")
    try:
        with warnings.catch_warnings():
            warnings.showwarning = one_line_warning
            fn = getattr(importlib.import_module(module), func)
            code = fn(args)
    except MamikitError as exc:
        print(f"mamikit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.filename is None and exc.strerror is None:
            raise
        # the environment failed (disk full, permission, Drive gone): name the file, no traceback
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"mamikit {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = "re-run it with --resume" if args.command == "train" else "re-run the same command to continue"
        print(f"mamikit {args.command}: interrupted; {again}", file=sys.stderr)
        return 130
    return int(code or 0)
