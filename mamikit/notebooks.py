"""Running the numbered notebooks headless (papermill), and keeping them clean in git.

`make demo` calls :func:`run_demo`: notebooks 01-09 executed in order on the
`demo` profile, each writing under one run root that the next one reads, with
the executed copies kept beside the results.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .utils import MamikitError, get_logger

log = get_logger(__name__)

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"

# Parameters of the demo: small enough for a 2-core CPU in minutes.
DEMO_PARAMETERS = {
    "PROFILE": "demo",
    "SEEDS": [0],
    "EPOCHS": 4,
    "EVALS_PER_EPOCH": 2,
    "ACCUMULATION": 1,
    "LR": 1e-3,
    "SYNTH_MAMI": 480,
    "SYNTH_MAMI_TEST": 240,
    "SYNTH_FBHM": 480,
}

# The smallest setting that still exercises every cell (used by the test suite).
SMALL_PARAMETERS = {
    "PROFILE": "demo",
    "SEEDS": [0],
    "EPOCHS": 1,
    "EVALS_PER_EPOCH": 2,
    "ACCUMULATION": 1,
    "LR": 1e-3,
    "SYNTH_MAMI": 120,
    "SYNTH_MAMI_TEST": 60,
    "SYNTH_FBHM": 120,
}


def notebook_paths(folder: Path = NOTEBOOK_DIR) -> list[Path]:
    """The numbered notebooks, in the order a researcher runs them."""
    paths = sorted(p for p in Path(folder).glob("[0-9][0-9]_*.ipynb"))
    if not paths:
        raise MamikitError(f"no numbered notebooks found in {folder}")
    return paths


# Notebook parameter -> Settings field (mamikit.settings): what run_notebooks writes into settings.json.
SETTINGS_PARAMETERS = {"PROFILE": "profile", "WEIGHTS": "weights", "RECIPE": "recipe", "DATA_ROOT": "data_root",
                       "FEATURES_ROOT": "features_root", "RUN_ROOT": "run_root", "SEEDS": "seeds", "DEVICE": "device",
                       "AMP": "amp", "EPOCHS": "epochs", "EVALS_PER_EPOCH": "evals_per_epoch", "ACCUMULATION": "accumulation",
                       "LR": "lr", "BATCH_SIZE": "batch_size", "CHECKPOINT_EVERY": "checkpoint_every"}


def write_settings(run_root, parameters: dict) -> Path:
    """`<run_root>/settings.json` from notebook parameters: the one file every notebook reads (SETTINGS)."""
    from .settings import Settings

    values = {field: parameters[name] for name, field in SETTINGS_PARAMETERS.items() if parameters.get(name) is not None}
    return Settings(**values).save(Path(run_root) / "settings.json")  # not $MAMIKIT_SETTINGS: the parameters say it all


def run_notebooks(run_root, parameters: dict | None = None, names: list[str] | None = None, folder: Path = NOTEBOOK_DIR,
                  kernel: str = "python3") -> list[Path]:
    """Execute notebooks with papermill into `<run_root>/notebooks/`.

    Args:
        run_root: where the notebooks write everything (RUN_ROOT); executed copies go to its notebooks/.
        parameters: values for the `parameters` cell; RUN_ROOT, DATA_ROOT and FEATURES_ROOT are filled in from
            run_root, and SETTINGS with `<run_root>/settings.json` written from them (`write_settings`).
        names: a subset of notebooks by file name stem prefix (e.g. ["01", "02"]); None runs all.
        folder: where the source notebooks are.
        kernel: Jupyter kernel name.
        log: where progress lines go.
    Returns:
        The executed notebook paths.
    """
    import papermill as pm

    run_root = Path(run_root).resolve()
    params = dict(parameters or DEMO_PARAMETERS)
    params.setdefault("RUN_ROOT", str(run_root))
    params.setdefault("DATA_ROOT", str(run_root / "data"))
    params.setdefault("FEATURES_ROOT", str(run_root / "features"))
    params.setdefault("SETTINGS", str(write_settings(run_root, params)))
    executed = []
    for path in notebook_paths(folder):
        if names and not any(path.stem.startswith(n) for n in names):
            continue
        target = run_root / "notebooks" / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        log.info("running %s ...", path.name)
        try:
            pm.execute_notebook(str(path), str(target), parameters=params, kernel_name=kernel, progress_bar=False, cwd=str(folder))
        except pm.PapermillExecutionError as exc:
            raise MamikitError(f"{path.name} failed in cell {exc.exec_count}: {exc.ename}: {exc.evalue} (executed copy: {target})") from None
        log.info("  %s done in %.0f s", path.name, time.time() - t0)
        executed.append(target)
    return executed


def run_demo(out="runs/demo", small: bool = False) -> Path:
    """The main job: notebooks 01-09 on the demo profile, then print the tables and figures."""
    out = Path(out)
    t0 = time.time()
    run_notebooks(out, SMALL_PARAMETERS if small else DEMO_PARAMETERS)
    report = out / "report"
    print(f"\nmamikit demo finished in {time.time() - t0:.0f} s; everything is under {out}/")
    for table in sorted(report.glob("table*.md")):
        print(f"\n{table}:\n{table.read_text()}")
    figures = sorted(report.rglob("*.png"))
    print("figures:")
    for fig in figures:
        print(f"  {fig}")
    return out


def strip_notebook(path: Path) -> bool:
    """Remove outputs, execution counts and widget state from a notebook; True if it changed."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    before = json.dumps(nb, sort_keys=True)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        cell.metadata.pop("execution", None)
        cell.metadata.pop("papermill", None)
    for key in ("widgets", "papermill"):
        nb.metadata.pop(key, None)
    if json.dumps(nb, sort_keys=True) == before:
        return False
    nbformat.write(nb, str(path))
    return True


def cli_demo(args) -> int:
    """`python -m mamikit demo`: run the notebooks headless on the demo profile."""
    run_demo(args.out, small=args.small)
    return 0


def cli_strip(args) -> int:
    """`python -m mamikit strip-notebooks`: strip outputs in place."""
    paths = []
    for p in map(Path, args.paths):
        paths.extend(sorted(p.glob("*.ipynb")) if p.is_dir() else [p])
    for p in paths:
        if strip_notebook(p):
            print(f"stripped {p}", file=sys.stderr)
    return 0
