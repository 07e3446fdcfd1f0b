"""Running the numbered notebooks headless (papermill), and keeping them clean in git.

`make demo` calls :func:`run_demo`: notebooks 00-10 executed in order on the
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

# The numbered notebooks: a checkout's notebooks/, or the copies an installed package carries (pyproject.toml).
_HERE = Path(__file__).resolve().parent
_CHECKOUT = _HERE.parent / "notebooks"
NOTEBOOK_DIR = _CHECKOUT if (_CHECKOUT / "00_setup.ipynb").is_file() else _HERE / "notebooks"

# The demo: the demo profile trains with its preset (settings.TRAINING_PRESETS["demo"]), on a synthetic set
# small enough for a 2-core CPU in minutes (notebook 01's parameters).
DEMO_SETTINGS = {"profile": "demo", "rounds": [1, 2, 3, 4, 5]}
DEMO_PARAMETERS = {"SYNTH_MAMI": 480, "SYNTH_MAMI_TEST": 160, "SYNTH_FBHM": 480, "SYNTH_SINGLE": 480}

# The smallest setting that still exercises every cell (used by the test suite).
SMALL_SETTINGS = {"profile": "demo", "epochs": 1, "rounds": [1, 2, 3, 4, 5]}
SMALL_PARAMETERS = {"SYNTH_MAMI": 120, "SYNTH_MAMI_TEST": 60, "SYNTH_FBHM": 120, "SYNTH_SINGLE": 120}


def notebook_paths(folder: Path = NOTEBOOK_DIR) -> list[Path]:
    """The numbered notebooks, in the order a researcher runs them."""
    paths = sorted(p for p in Path(folder).glob("[0-9][0-9]_*.ipynb"))
    if not paths:
        raise MamikitError(f"no numbered notebooks found in {folder}")
    return paths


def write_settings(run_root, settings: dict) -> Path:
    """`<run_root>/settings.json` from settings values by name (data, store and runs under run_root by default)."""
    from .settings import settings_from

    run_root = Path(run_root)
    defaults = {"run_root": str(run_root), "data_root": str(run_root / "data"),
                "features_root": str(run_root / "features")}
    return settings_from(dict(defaults, **settings)).save(run_root / "settings.json")  # not $MAMIKIT_SETTINGS


def run_notebooks(run_root, settings: dict | None = None, parameters: dict | None = None,
                  names: list[str] | None = None, folder: Path = NOTEBOOK_DIR, kernel: str = "python3",
                  seconds: dict | None = None) -> list[Path]:
    """Execute notebooks with papermill into `<run_root>/notebooks/`.

    Args:
        run_root: where the notebooks write everything; executed copies go to its notebooks/.
        settings: settings values by name (`mk.settings_fields()`), written to `<run_root>/settings.json`
            (`write_settings`), the SETTINGS every notebook reads; None: the demo's.
        parameters: other values of the notebooks' `parameters` cells (e.g. SYNTH_MAMI, OVERRIDES); each
            notebook gets those it declares.
        names: a subset of notebooks by file name stem prefix (e.g. ["01", "02"]); None runs all.
        folder: where the source notebooks are.
        kernel: Jupyter kernel name.
        seconds: a dict to fill with each notebook's wall time (file name -> seconds).
    Returns:
        The executed notebook paths.
    """
    import papermill as pm

    run_root = Path(run_root).resolve()
    params = dict(DEMO_PARAMETERS if parameters is None else parameters)
    params.setdefault("SETTINGS", str(write_settings(run_root, DEMO_SETTINGS if settings is None else settings)))
    executed = []
    for path in notebook_paths(folder):
        if names and not any(path.stem.startswith(n) for n in names):
            continue
        target = run_root / "notebooks" / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        log.info("running %s ...", path.name)
        try:
            # each notebook gets the parameters its parameters cell declares (papermill warns about the others)
            declared = set(pm.inspect_notebook(str(path)))
            pm.execute_notebook(str(path), str(target), parameters={k: v for k, v in params.items() if k in declared},
                                kernel_name=kernel, progress_bar=False, cwd=str(folder))
        except pm.PapermillExecutionError as exc:
            raise MamikitError(f"{path.name} failed in cell {exc.exec_count}: {exc.ename}: {exc.evalue} "
                               f"(executed copy: {target})") from None
        log.info("  %s done in %.0f s", path.name, time.time() - t0)
        if seconds is not None:
            seconds[path.name] = time.time() - t0
        executed.append(target)
    return executed


def run_demo(out="runs/demo", small: bool = False) -> Path:
    """The main job: notebooks 00-10 on the demo profile (rounds 1-5), then print the tables and figures."""
    out = Path(out)
    t0 = time.time()
    seconds: dict[str, float] = {}
    run_notebooks(out, SMALL_SETTINGS if small else DEMO_SETTINGS, SMALL_PARAMETERS if small else DEMO_PARAMETERS,
                  seconds=seconds)
    report = out / "report"
    print(f"\nmamikit demo finished in {time.time() - t0:.0f} s; everything is under {out}/")
    print("seconds per notebook: " + ", ".join(f"{name[:2]} {s:.0f}" for name, s in seconds.items()))
    for table in sorted(report.glob("table*.md")):
        print(f"\n{table}:\n{table.read_text()}")
    figures = sorted(report.rglob("*.png"))
    print("figures:")
    for fig in figures:
        print(f"  {fig}")
    return out


# ----------------------------------------------------------------------------- what the notebooks show


def data_overview(datasets) -> pd.DataFrame:
    """Per dataset (from `load_datasets`): its labels, memes per split, rows dropped as inconsistent and problems
    found."""
    import pandas as pd

    rows = {name: {"labels": ", ".join(ds.labels), **ds.counts(), "dropped as inconsistent": ds.dropped_inconsistent,
                   "problems": len(ds.problems), "first problem": str(ds.problems[0]) if ds.problems else ""}
            for name, ds in datasets.items()}
    return pd.DataFrame(rows).T.rename_axis("dataset")


def label_prevalence(datasets) -> pd.DataFrame:
    """Fraction of positives per dataset, label and split (table 1); unknown labels (-1) are left out."""
    import pandas as pd

    rows = []
    for name, ds in datasets.items():
        for split, frame in ds.splits.items():
            for label in ds.labels:
                known = frame[label] >= 0
                rows.append({"dataset": name, "label": label, "split": split,
                             "positive": float(frame.loc[known, label].mean()) if known.any() else None})
    table = pd.DataFrame(rows).pivot_table(index=["dataset", "label"], columns="split", values="positive", sort=False)
    return table.reindex(columns=[s for s in ("train", "dev", "test") if s in table.columns])


def example_memes(dataset, split: str = "train", n: int = 8, path=None):
    """The first `n` memes of one split of a dataset (`load_datasets`' DatasetSplits) with their positive labels,
    as a figure."""
    from .viz import plot_samples

    memes = dataset.splits[split].head(n)
    tags = [", ".join(label for label in dataset.labels if row[label] == 1) or f"not {dataset.labels[0]}"
            for _, row in memes.iterrows()]
    return plot_samples(list(memes["image"]), [str(t)[:60] for t in memes["text"]], tags, path=path)


def show_files(folder, *patterns: str):
    """A panel (`widgets.Panel`) showing the files of `folder` that match `patterns`, each under its name: PNGs as
    pictures, CSVs as tables."""
    import html

    import pandas as pd

    from .widgets import Panel

    paths = [p for pattern in patterns for p in sorted(Path(folder).glob(pattern))]
    items = []
    for path in paths:
        items.append(f"<h4 style='margin:4px 0'>{html.escape(path.name)}</h4>")
        if path.suffix == ".png":
            items.append(path)
        elif path.suffix == ".csv":
            items.append(pd.read_csv(path))
        else:
            items.append(f"<pre>{html.escape(path.read_text(encoding='utf-8'))}</pre>")
    panel = Panel({}, [], lambda: None)
    panel.show(*items, paths=paths)
    return panel


def tensorboard(logdir, start: bool | None = None) -> bool:
    """TensorBoard on `logdir` inside the running notebook (`%tensorboard`); start None: only on Colab. True if
    started.

    Headless runs (papermill, `make demo`) leave it off: the magic starts a server that never ends.
    """
    import builtins

    shell = getattr(builtins, "get_ipython", lambda: None)()  # defined inside IPython kernels only
    if start is None:
        start = "google.colab" in sys.modules
    if not start or shell is None:
        print(f"TensorBoard not started here; run `tensorboard --logdir {logdir}` or set OPEN_TENSORBOARD = True")
        return False
    shell.run_line_magic("load_ext", "tensorboard")
    shell.run_line_magic("tensorboard", f"--logdir {logdir}")
    return True


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
