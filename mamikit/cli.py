"""Headless entry points: `python -m mamikit <command> ...`, every command in this file.

Each command is a thin function over the library: it reads the parsed
arguments, calls one mamikit function and prints what was done. The parsers
and the commands live here together; the library modules they call are
imported only when a command runs, so that `--help` stays fast. `train` and
`round` take one option per Settings and TrainConfig field
(`settings.add_setting_options`): a field added there is an option here.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from .experiments import ROUNDS
from .profiles import PROFILE_NAMES
from .settings import add_setting_options
from .utils import MamikitError, set_message_prefix

# command -> the function below that runs it; it takes the parsed arguments and returns an exit code
COMMANDS = {
    "synth": "cli_synth",
    "check": "cli_check",
    "score": "cli_score",
    "extract": "cli_extract",
    "train": "cli_train",
    "round": "cli_round",
    "report": "cli_report",
    "predict": "cli_predict",
    "demo": "cli_demo",
    "profiles": "cli_profiles",
    "strip-notebooks": "cli_strip",
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
    parser = argparse.ArgumentParser(prog="python -m mamikit",
                                     description="mamikit: multi-modal meme classification (SemEval-2022 Task 5).")
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
    p.add_argument("--chunk-rows", type=int, default=256,
                   help="memes per resumable chunk (smaller: less lost when killed)")

    # train and round: one option per Settings / TrainConfig field (mamikit.settings.add_setting_options)
    p = sub.add_parser("train", help="train one experiment into a run directory")
    p.add_argument("--experiment", required=True, help="paper experiment name: 00 01 02 03 10 12 13 20 21 30")
    p.add_argument("--out", required=True, help="run directory (e.g. runs/round1/02-seed0)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    add_setting_options(p, exclude=("seeds", "run_root"))
    _backbone_args(p)

    p = sub.add_parser("round", help="run every experiment of a round: the paper's 1-4 or round 5 (section 6's "
                                     "future work); skips complete runs")
    p.add_argument("--round", required=True, type=int, choices=sorted(ROUNDS))
    p.add_argument("--out", help="runs root; runs land in OUT/round<N>/<exp>-seed<k> (default: the settings' runs "
                                 "folder, <run_root>/runs)")
    p.add_argument("--rerun-changed", action="store_true",
                   help="train again (replacing them) the runs of this round recorded with other settings")
    p.add_argument("--single-stage", action="store_true",
                   help="rounds 4-5: experiment 30 (and round 5's) as one 30-epoch schedule instead of 15 epochs "
                        "continued for 15 (docs/fidelity.md row 3)")
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

    p = sub.add_parser("demo", help="run the numbered notebooks (00-10) headless on the demo profile")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--small", action="store_true", help="smallest settings (used by the tests)")

    p = sub.add_parser("profiles", help="list the backbone profiles of mamikit/profiles.json, or build some and "
                                        "print their widths and parameter counts")
    p.add_argument("--describe", nargs="*", metavar="PROFILE", default=None,
                   help="build these profiles (none named: every tiny one) and print what their models report")
    p.add_argument("--weights", choices=["pretrained", "random"], default="random",
                   help="weights of the built models (default: random, nothing downloaded)")

    p = sub.add_parser("strip-notebooks", help="remove outputs from notebooks before commit")
    p.add_argument("paths", nargs="+")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the command, and turn user errors into one-line messages."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        # a warning is one line naming the command, not two lines pointing into mamikit's source
        print(f"mamikit {args.command}: warning: {message}", file=sys.stderr)

    set_message_prefix(f"mamikit {args.command}: ")
    try:
        with warnings.catch_warnings():
            warnings.showwarning = one_line_warning
            code = globals()[COMMANDS[args.command]](args)
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


# ----------------------------------------------------------------------------- the commands


def cli_synth(args) -> int:
    """`synth --out DIR [--seed S] [--mami N] [--mami-test N] [--fbhm M]`: a synthetic set in the official layouts."""
    from .synthetic import generate

    info = generate(args.out, seed=args.seed, n_mami=args.mami, n_mami_test=args.mami_test, n_fbhm=args.fbhm)
    for dataset, parts in info["counts"].items():
        print(f"{dataset}: " + ", ".join(f"{k} {v}" for k, v in parts.items()))
    print("noise-free ceilings on this set: " + ", ".join(f"{k} {v:.3f}" for k, v in info["ceilings"].items()))
    print(f"wrote {info['root']} in {info['seconds']} s")
    return 0


def cli_check(args) -> int:
    """`check --data DIR`: one line per problem and a summary; 1 if any problem."""
    from .data import check

    result = check(args.data)
    total = 0
    for ds in result.values():
        for p in ds.problems:
            print(p)
        total += len(ds.problems)
    for name, ds in result.items():
        counts = ", ".join(f"{k} {v}" for k, v in ds.counts().items())
        extra = f", {ds.dropped_inconsistent} dropped as inconsistent" if ds.dropped_inconsistent else ""
        print(f"{name}: {counts}; {len(ds.problems)} problems{extra}")
        for note in ds.notes:
            print(f"{name}: {note}")
    print("clean" if total == 0 else f"{total} problems")
    return 0 if total == 0 else 1


def cli_score(args) -> int:
    """`score TRUTH ANSWER`: print `taska: x` and `taskb: y` like the official scores file."""
    import os

    from .metrics import score_files

    scores = score_files(os.fspath(args.truth), os.fspath(args.answer))
    print(f"taska: {scores['taska']}")
    print(f"taskb: {scores['taskb']}")
    return 0


def cli_extract(args) -> int:
    """`extract`: fill a feature store and print what was done."""
    from .extraction import CHUNK_ROWS, extract
    from .profiles import get_profile
    from .store import FeatureStore

    profile = get_profile(args.profile, clip_model=args.clip_model, clip_pretrained=args.clip_pretrained,
                          detr_model=args.detr_model, text_model=args.text_model, weights=args.weights)
    summary = extract(args.data, args.out, profile, backbones=args.backbones, batch_size=args.batch_size,
                      device=args.device, dtype=args.dtype, split_seed=args.split_seed,
                      chunk_rows=getattr(args, "chunk_rows", CHUNK_ROWS))
    per_backbone: dict[str, list[int]] = {}  # backbone -> [stored rows, skipped memes, bytes]
    for _, _, name, info in FeatureStore(summary["store"]).entries():
        counts = per_backbone.setdefault(name, [0, 0, 0])
        counts[0] += int(info.get("rows", 0))
        counts[1] += int(info.get("skipped", 0))
        counts[2] += int(info.get("bytes", 0))
    for name, (rows, skipped, size) in per_backbone.items():
        print(f"{name}: {rows} stored, {skipped} skipped, {size / max(rows, 1) / 1024:.1f} KiB per meme")
    skipped = sum(len(v) for v in summary["skipped"].values())
    print(f"{summary['store']}: {len(summary['written'])} file(s) written, {len(summary['already_complete'])} "
          f"already complete, {skipped} meme(s) skipped (listed in manifest.json), {summary['seconds']} s")
    return 0


def cli_train(args) -> int:
    """`train`: one experiment into a run directory, with the settings' training values."""
    import time

    from .experiments import get_experiment
    from .profiles import get_profile
    from .settings import settings_from_args
    from .train import train

    settings = settings_from_args(args)  # the file's (or $MAMIKIT_SETTINGS') values, then the options given
    profile = get_profile(settings.profile, clip_model=args.clip_model, clip_pretrained=args.clip_pretrained,
                          detr_model=args.detr_model, text_model=args.text_model, weights=settings.weights)
    t0 = time.time()
    experiment = get_experiment(args.experiment, recipe=settings.recipe)
    out = train(experiment, settings.data_root, settings.features_root, args.out, profile=profile,
                train_cfg=settings.train_config(), resume=args.resume, progress=sys.stderr.isatty())
    print(f"run written to {out} in {time.time() - t0:.0f} s")
    return 0


def cli_round(args) -> int:
    """`round`: run one round for the given seeds (a shard of it, on Ray, or list it)."""
    import time

    from .profiles import get_profile
    from .rounds import _resolve_runs, run_round, run_state, summary_table
    from .settings import settings_from_args

    settings = settings_from_args(args)  # the file's (or $MAMIKIT_SETTINGS') values, then the options given
    overrides, recipe, seeds = settings.train_overrides(), settings.recipe, list(settings.seeds)
    data, features, out = settings.data_root, settings.features_root, args.out or str(settings.runs)
    profile = get_profile(settings.profile, clip_model=args.clip_model, clip_pretrained=args.clip_pretrained,
                          detr_model=args.detr_model, text_model=args.text_model, weights=settings.weights)
    stages = {"recipe": recipe, "single_stage": args.single_stage}
    if args.list:
        for run in _resolve_runs(args.round, seeds, args.shard):
            print(f"{run.name}\t{run_state(out, run, profile, overrides, **stages)}")
        return 0
    t0 = time.time()
    common = dict(profile=profile, seeds=seeds, train_overrides=overrides, shard=args.shard,
                  rerun_changed=args.rerun_changed, **stages)
    if args.engine == "ray":
        from .ray_engine import run_round_ray

        results = run_round_ray(args.round, data, features, out, address=args.address, num_cpus=args.num_cpus,
                                **common)
    else:
        results = []
        run_round(args.round, data, features, out, results=results, **common)
    print(summary_table(results))
    print(f"round {args.round}: {len(results)} runs in {time.time() - t0:.1f} s")
    if any(r.state == "changed" for r in results):
        print("runs marked `changed` were trained with other settings and were left alone; "
              "--rerun-changed trains them again (their folders are replaced)")
    return 1 if any(r.state in ("failed", "changed") for r in results) else 0


def cli_report(args) -> int:
    """`report RUNS --out DIR [--data D] [--features F]`: tables 2-5 and the figures."""
    from pathlib import Path

    from .analysis import write_report

    written = write_report(args.runs, args.out, data_root=args.data, features_root=args.features)
    print(f"report: {len(written)} files in {Path(args.out).resolve()}")
    return 0


def cli_predict(args) -> int:
    """`predict --run DIR --image FILE --text TEXT [--json]`: probabilities and the attention's split."""
    import json

    from .predict import predict_meme

    result = predict_meme(args.run, args.image, args.text, checkpoint=args.checkpoint, device=args.device)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for task, probs in result["probabilities"].items():
        print(f"{task}: " + ", ".join(f"{label} {p:.3f}" for label, p in probs.items()))
    if result["attention_by_encoder"]:
        shares = result["attention_by_encoder"].items()
        print("decoder cross-attention: " + ", ".join(f"{enc} {share:.1%}" for enc, share in shares))
    return 0


def cli_demo(args) -> int:
    """`demo`: run the notebooks headless on the demo profile."""
    from .notebooks import run_demo

    run_demo(args.out, small=args.small)
    return 0


def cli_profiles(args) -> int:
    """`profiles [--describe [NAME ...]] [--weights random|pretrained]`: the registry, or built models' widths."""
    from .backbones import describe
    from .profiles import is_tiny, list_profiles

    if args.describe is None:
        print(list_profiles().drop(columns="about").to_string(index=False))
        return 0
    names = args.describe or [n for n in PROFILE_NAMES if is_tiny(n)]
    for name in names:
        widths = describe(name, weights=args.weights)
        parts = [f"{kind} {info['dim']} ({info['params'] / 1e6:.2f}M params)" if info else f"{kind} none"
                 for kind, info in widths.items()]
        print(f"{name}: " + ", ".join(parts))
    return 0


def cli_strip(args) -> int:
    """`strip-notebooks`: strip outputs in place."""
    from pathlib import Path

    from .notebooks import strip_notebook

    paths = []
    for p in map(Path, args.paths):
        paths.extend(sorted(p.glob("*.ipynb")) if p.is_dir() else [p])
    for p in paths:
        if strip_notebook(p):
            print(f"stripped {p}", file=sys.stderr)
    return 0
