"""Interactive views for the notebooks (ipywidgets): the data (table 1), the feature store (section 3.1),
the rounds' results (tables 2-5, figure 5 and learning curves), figures 3-4, and one meme through figure 1.

Each function returns a :class:`Panel`: an ipywidgets VBox with its controls
above one Output. The Output is written as plain display data (PNG images and
HTML) rather than captured from the kernel, so the view is there as soon as the
function returns, and the same code runs without Jupyter: tests set the
controls' values, click their buttons and read ``panel.output.outputs`` and
``panel.shown`` (what the Output shows, as data). Every figure comes from the
library's own functions.

Displayed in a notebook, a panel writes the live widget (its controls, with a
static copy of them as HTML) followed by its view as ordinary outputs, one per
figure (image/png) or table (text/html): viewers that render no widgets (GitHub,
nbviewer, nbconvert's HTML, a notebook opened without its kernel) show every
figure, and viewers that do show them once. The live Output then stays empty
until a control changes; it shows each new view above the one drawn when the
cell ran. The panels use what ipywidgets 7.8 and 8 have in common.

Longer than mamikit's usual module (about 530 lines): one view per notebook (01, 02, 03-07,
08, 09), each a few dozen lines of controls over library calls, all built on the one
:class:`Panel` (live widget plus static copy) defined at the top. Kept together, every
notebook's controls read and behave alike; what they show is computed in the modules they call.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import html
import io
import shutil
import tempfile
from pathlib import Path

import ipywidgets as W
import numpy as np
import pandas as pd

from .analysis import (evaluation_scores, experiment_table, pick_figure_run, plot_box, plot_tukey, read_configs,
                       read_logs, run_max_scores, tukey)
from .data import SPLITS, load_datasets
from .experiments import ROUND_TABLES, ROUNDS
from .curves import plot_curves, read_curves, styled_table
from .registry import official_task_names, primary_dataset
from .utils import MamikitError, open_image_rgb
from .viz import plot_clip_crops, plot_counts, plot_prediction

ALL = "all"  # the picker value that selects everything
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"  # the MIME type of a live widget (ipywidgets 7 and 8)
THUMB = 384  # longest side of a meme shown in a panel, in pixels
# a control in a panel's static copy (viewers without widgets): a grey box like the live one
CONTROL_STYLE = ("display:inline-block;border:1px solid #bbb;border-radius:3px;padding:2px 8px;margin:2px 6px 6px 0;"
                 "font:13px sans-serif;background:#f5f5f5")


# ----------------------------------------------------------------------------- display data


def _item(obj) -> dict:
    """One Output entry (nbformat display data) for a figure, image, PNG file, table or HTML string."""
    from matplotlib.figure import Figure
    from PIL import Image

    data, buf = {}, io.BytesIO()
    if isinstance(obj, Figure):
        obj.savefig(buf, format="png", dpi=obj.dpi)
        data = {"image/png": buf.getvalue(), "text/plain": f"<{obj.get_suptitle() or 'figure'}>"}
    elif isinstance(obj, Image.Image):
        image = obj.copy()
        image.thumbnail((THUMB, THUMB))
        image.save(buf, format="PNG")
        data = {"image/png": buf.getvalue(), "text/plain": f"<image {obj.size[0]}x{obj.size[1]}>"}
    elif isinstance(obj, Path):  # a PNG written by the library
        data = {"image/png": obj.read_bytes(), "text/plain": f"<{obj.name}>"}
    elif isinstance(obj, pd.DataFrame) or type(obj).__name__ == "Styler":
        data = {"text/html": obj.to_html(),
                "text/plain": (obj if isinstance(obj, pd.DataFrame) else obj.data).to_string()}
    else:
        data = {"text/html": str(obj), "text/plain": html.unescape(str(obj))}
    if "image/png" in data:
        data["image/png"] = base64.b64encode(data["image/png"]).decode("ascii")
    return {"output_type": "display_data", "metadata": {}, "data": data}


class Panel(W.VBox):
    """A view: `controls` by name above one `output`; `shown` describes what the output holds now."""

    def __init__(self, controls: dict[str, W.Widget], rows: list, draw):
        self.output = W.Output()
        super().__init__([*rows, self.output])
        self.controls, self.shown, self._draw, self._held = controls, {}, draw, 0
        self._view: tuple[dict, ...] = ()  # the view as display data (what `show` drew last)

    def show(self, *items, **shown) -> None:
        """Replace the output with `items` (figures, images, tables, HTML) and record `shown`."""
        self._view = self.output.outputs = tuple(_item(x) for x in items)
        self.shown = shown

    def display_outputs(self) -> list[dict]:
        """What displaying the panel writes into the notebook (nbformat display data): the live widget, its
        controls as static HTML beside it, then the view, each figure and table as its own output.

        A panel without controls (`notebooks.show_files`) is its view alone.
        """
        view = [dict(o) for o in self._view]
        if not self.controls:
            return view
        texts = self._control_texts()
        data = {"text/plain": " | ".join(texts) or type(self).__name__,
                "text/html": "<div>" + "".join(f"<span style='{CONTROL_STYLE}'>{html.escape(t)}</span>"
                                               for t in texts) + "</div>",
                WIDGET_VIEW: {"version_major": 2, "version_minor": 0, "model_id": self.model_id}}
        return [{"output_type": "display_data", "metadata": {}, "data": data}, *view]

    def _ipython_display_(self, **kwargs) -> None:
        """Display the live widget and the current view as separate outputs (`display_outputs`).

        Viewers that render widgets prefer the widget's MIME type over any HTML in the same
        output, so the figures go into outputs of their own; the live Output is emptied so that
        it does not show them twice, and shows the next view when a control changes.
        """
        from IPython.display import publish_display_data

        for out in self.display_outputs():
            publish_display_data(out["data"], out["metadata"])
        if self.controls:
            self.output.outputs = ()
            if hasattr(self, "_handle_displayed"):  # ipywidgets 7 runs its `on_displayed` callbacks here
                self._handle_displayed(**kwargs)

    def _control_texts(self) -> list[str]:
        """The controls as they stand (a picker as "name: value", a button as its name), for the static copy."""
        parts = []
        for name, widget in self.controls.items():
            if isinstance(widget, (W.Button, W.FileUpload)):
                parts.append(widget.description)
            else:
                value = getattr(widget, "label", None) or widget.value
                parts.append(f"{widget.description or name}: {str(value)[:60]}")
        return parts

    @contextlib.contextmanager
    def hold(self):
        """Change several controls without redrawing after each."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1

    def refresh(self, *_) -> None:
        """Redraw from the controls' values; a MamikitError is shown in place of the view."""
        if self._held:
            return
        try:
            self._draw()
        except MamikitError as exc:
            self.show(f"<pre>{html.escape(str(exc))}</pre>", error=str(exc))

    def redraw_on(self, *names: str) -> None:
        """Redraw whenever one of these controls changes its value."""
        for name in names:
            self.controls[name].observe(self.refresh, names="value")


def _heading(text: str) -> str:
    return f"<h4 style='margin:4px 0'>{html.escape(text)}</h4>"


# ----------------------------------------------------------------------------- 01: the data


def meme_browser(data_root, dataset: str | None = None, split: str = ALL, label: str = ALL) -> Panel:
    """Browse a data folder's memes one at a time (image, caption, labels, split), filtered by split and label.

    Args:
        data_root: the data folder (MAMI/, FBHM/, ...), read with `load_datasets`.
        dataset: the dataset shown first (default: the primary one).
        split: "all", "train", "dev" or "test".
        label: "all", "none" (every label 0) or a label name (memes where it is 1).
    Returns:
        A Panel; `shown` holds the filtered `ids`, the `index` and `id` of the meme shown, its `split` and `labels`.
    """
    loaded = load_datasets(data_root)
    dataset = dataset or (primary_dataset() if primary_dataset() in loaded else next(iter(loaded)))
    if dataset not in loaded:
        raise MamikitError(f"{data_root}: no {dataset} data (found {', '.join(loaded)})")
    frames = {name: pd.concat([df.assign(split=s) for s, df in ds.splits.items()], ignore_index=True)
              for name, ds in loaded.items()}
    c = {"dataset": W.Dropdown(options=list(loaded), value=dataset, description="dataset"),
         "split": W.Dropdown(options=[ALL, *SPLITS], value=split, description="split"),
         "label": W.Dropdown(options=[ALL, "none", *loaded[dataset].labels], value=label, description="label"),
         "previous": W.Button(description="◀ previous"), "next": W.Button(description="next ▶")}
    position = {"index": 0}

    def draw():
        ds = loaded[c["dataset"].value]
        memes = frames[ds.name]
        if c["split"].value != ALL:
            memes = memes[memes["split"] == c["split"].value]
        if c["label"].value == "none":
            memes = memes[(memes[list(ds.labels)] == 0).all(axis=1)]
        elif c["label"].value != ALL:
            memes = memes[memes[c["label"].value] == 1]
        ids = memes["id"].tolist()
        if not ids:
            panel.show(_heading(f"{ds.name}: no meme matches"), ids=[], index=None, id=None)
            return
        i = position["index"] = position["index"] % len(ids)
        meme = memes.iloc[i]
        on = [lab for lab in ds.labels if meme[lab] == 1]
        tags = ("gold labels unknown" if any(meme[lab] < 0 for lab in ds.labels)
                else ", ".join(on) or "none of " + ", ".join(ds.labels))
        text = (f"<p><b>{html.escape(str(meme['text']))}</b></p><p>labels: {html.escape(tags)} "
                f"&middot; split: {meme['split']}"
                f" &middot; id: {html.escape(str(meme['id']))}</p>")
        panel.show(_heading(f"{ds.name}: meme {i + 1} of {len(ids)}"), open_image_rgb(meme["image"]), text,
                   ids=ids, index=i, id=meme["id"], split=meme["split"], labels=on)

    def new_filter(change):
        position["index"] = 0
        if change["owner"] is c["dataset"]:
            with panel.hold():
                c["label"].options = [ALL, "none", *loaded[change["new"]].labels]
                c["label"].value = ALL
        panel.refresh()

    panel = Panel(c, [W.HBox([c["dataset"], c["split"], c["label"]]), W.HBox([c["previous"], c["next"]])], draw)
    for name in ("dataset", "split", "label"):
        c[name].observe(new_filter, names="value")
    c["previous"].on_click(lambda _: position.update(index=position["index"] - 1) or panel.refresh())
    c["next"].on_click(lambda _: position.update(index=position["index"] + 1) or panel.refresh())
    panel.refresh()
    return panel


# ----------------------------------------------------------------------------- 02: the feature store


def _store_stats(features) -> dict[str, np.ndarray]:
    """Per meme: DETR queries kept by the object mask, text tokens ([CLS] and [SEP] included)."""
    out = {}
    if features.detr_mask is not None:
        out["DETR queries kept"] = features.detr_mask.sum(1).numpy()
    if features.text_offsets is not None:
        out["text tokens"] = np.diff(features.text_offsets.numpy())
    return out


def store_summary(features_root, data_root=None, n_memes: int = 3, seed: int = 0) -> Panel:
    """Kept DETR queries and text lengths per meme in a feature store, and a few memes' CLIP crops.

    Args:
        features_root: the store written by `extract`.
        data_root: the data folder the store was extracted from; without it no crops are drawn.
        n_memes: memes whose crops are shown; "other memes" draws a new sample.
        seed: seed of the first sample.
    Returns:
        A Panel; `shown` holds the `summary` table, the `split` ("MAMI/train") and the `memes` whose crops are drawn.
    """
    from .store import FeatureStore

    store = FeatureStore(features_root)
    pairs = [f"{d}/{s}" for d, s in store.splits()]
    if not pairs:
        raise MamikitError(f"{features_root}: the store holds no complete split")
    loaded = {p: store.load(*p.split("/")) for p in pairs}  # memory-mapped: nothing is read but the masks and offsets
    stats, ids = {p: _store_stats(f) for p, f in loaded.items()}, {p: f.ids for p, f in loaded.items()}
    summary = pd.DataFrame([{"split": p, "memes": len(ids[p]),
                             **{f"{k} {f}": round(float(getattr(np, f)(v)), 1) if len(v) else None
                                for k, v in s.items() for f in ("mean", "min", "max")}}
                            for p, s in stats.items()]).set_index("split")
    split_seed = int(store.manifest.get("split_seed", 0))
    tables: dict[str, pd.DataFrame] = {}
    c = {"split": W.Dropdown(options=pairs, value=pairs[0], description="split"),
         "other": W.Button(description="other memes")}
    sample = {"seed": seed}

    def draw():
        pair = c["split"].value
        items, memes = [summary, plot_counts(stats[pair], f"{pair}: {len(ids[pair])} memes")], []
        if data_root is not None:
            dataset, split = pair.split("/")
            if dataset not in tables:
                tables[dataset] = load_datasets(data_root, [dataset], split_seed=split_seed)[dataset].splits
            frame = tables[dataset][split][lambda f: f["id"].isin(ids[pair])]
            chosen = frame.sample(min(n_memes, len(frame)), random_state=sample["seed"]) if len(frame) else frame
            memes = chosen["id"].tolist()
            if memes:
                row = {m: i for i, m in enumerate(ids[pair])}
                notes = [", ".join(f"{int(v[row[m]])} {k}" for k, v in stats[pair].items()) for m in memes]
                items.append(plot_clip_crops(chosen["image"].tolist(), memes, notes))
        panel.show(*items, summary=summary, split=pair, memes=memes)

    panel = Panel(c, [W.HBox([c["split"], c["other"]])], draw)
    panel.redraw_on("split")
    c["other"].on_click(lambda _: sample.update(seed=sample["seed"] + 1) or panel.refresh())
    panel.refresh()
    return panel


# ---------------------------------------------------------------------------- 03-07: tables, figure 5, learning curves


def _round_options(present: set) -> list[tuple[str, int]]:
    rounds = [(f"round {r} (table {ROUND_TABLES[r]})", r) for r, exps in ROUNDS.items() if present & set(exps)]
    return rounds + [("all experiments", 0)]


def results_explorer(runs_root, round_no: int | None = None, task: str | None = None, split: str = "test",
                     loss_term: str | None = "loss/total") -> Panel:
    """A round's table, box plot and Tukey HSD of per-evaluation scores (figure 5), and learning curves.

    Args:
        runs_root: the runs folder (`<runs_root>/round<N>/<experiment>-seed<k>`), read with `read_logs`.
        round_no: the round shown first (1-4; 0 for every experiment; default: the first round with runs).
        task: the task of the box, Tukey and curves (default: the official Task A).
        split: the split of the box, Tukey and curves.
        loss_term: the training loss curve drawn beside the scores (`curves.read_curves` names, e.g.
            "loss/total", "loss/Task_A/bce", "lr"), where logged; None: no loss panel.
    Returns:
        A Panel with round, task, split and run pickers (the run picker narrows the curves to one run)
        and a "reload logs" button for runs still training; `shown` holds the `experiments`, the
        `table` (ExperimentTable), the box plot's `scores` and the `curves` rows drawn.
    """
    state: dict = {}

    def reload(_=None):
        """Read the logs again: runs may have evaluated or finished since."""
        state["logs"] = read_logs(runs_root)
        if state["logs"].empty:
            raise MamikitError(f"{runs_root}: no run logs (log.jsonl) found")
        state["curves"], state["configs"] = read_curves(runs_root), read_configs(state["logs"])

    def follow_logs() -> list[str]:
        """Round and run options follow the logs, the current picks kept where they still exist -> the round's
        experiments."""
        present = set(state["logs"]["experiment"])
        rounds = _round_options(present)
        r = c["round"].value if c["round"].value in [v for _, v in rounds] else rounds[0][1]
        exps = [e for e in (ROUNDS[r] if r else sorted(present)) if e in present]
        runs = sorted(state["logs"].loc[state["logs"]["experiment"].isin(exps), "run"].unique())
        run = c["run"].value
        with panel.hold():
            c["round"].options, c["round"].value = rounds, r
            c["run"].options, c["run"].value = [(ALL, ALL), *((x, x) for x in runs)], run if run in runs else ALL
        state["round"] = {v: k for k, v in rounds}[r]
        return exps

    def draw():
        exps, logs, task_, split_ = follow_logs(), state["logs"], c["task"].value, c["split"].value
        if not exps:
            panel.show(_heading("no runs of this round yet"), experiments=[])
            return
        table = experiment_table(logs, exps, state["configs"])
        scores = evaluation_scores(logs, task_, exps, split=split_)
        items = [_heading(f"{state['round']}: max score per run, mean over seeds"), styled_table(table)]
        if len(scores):
            items.append(plot_box(scores, f"{task_} on {split_}, per evaluation", f"{task_} score",
                                  [e for e in exps if e in set(scores["group"])]))
            try:
                items.append(plot_tukey(tukey(scores), f"Tukey HSD, {task_} on {split_}", f"{task_} score"))
            except MamikitError as exc:
                items.append(f"<p>Tukey HSD not drawn: {html.escape(str(exc))}</p>")
        curves = state["curves"][state["curves"]["experiment"].isin(exps)]
        if c["run"].value != ALL:
            curves = curves[curves["run"] == c["run"].value]
        names = [f"score/{split_}/{task_}"] + ([loss_term] if loss_term in set(curves["curve"]) else [])
        items.append(plot_curves(curves, names) if set(names) <= set(curves["curve"])
                     else _heading("no learning curves logged yet"))
        panel.show(*items, experiments=exps, table=table, scores=scores, curves=curves)

    reload()
    rounds = _round_options(set(state["logs"]["experiment"]))
    tasks = list(dict.fromkeys([*official_task_names(), *sorted(state["logs"]["task"].dropna().unique())]))
    c = {"round": W.Dropdown(options=rounds, value=rounds[0][1] if round_no is None else round_no,
                             description="round"),
         "task": W.Dropdown(options=tasks, value=task or tasks[0], description="task"),
         "split": W.Dropdown(options=list(SPLITS), value=split, description="split"),
         "run": W.Dropdown(options=[(ALL, ALL)], value=ALL, description="run"),
         "reload": W.Button(description="reload logs")}
    panel = Panel(c, [W.HBox([c["round"], c["task"], c["split"]]), W.HBox([c["run"], c["reload"]])], draw)
    panel.redraw_on("round", "task", "split", "run")
    c["reload"].on_click(lambda _: reload() or panel.refresh())
    panel.refresh()
    return panel


# ----------------------------------------------------------------------------- 08: figures 3-4


def _run_names(logs: pd.DataFrame, run_dirs) -> dict[str, str]:
    """Each run directory's folder relative to the runs root ("round4/10-seed0"), the pickers' labels."""
    return {d: logs.loc[logs["run_dir"] == d, "run"].iloc[0] for d in run_dirs}


def figure_explorer(runs_root, features_root=None, data_root=None, checkpoint: str = "best", out_dir=None,
                    device: str = "auto") -> Panel:
    """Figures 3 (t-SNE) and 4 (self- and cross-attention) of a chosen run and checkpoint, as `figures_for_run`
    draws them.

    Args:
        runs_root: the runs folder.
        features_root, data_root: default to the folders recorded in each run's config.json.
        checkpoint: "best" (best dev score of the official Task A) or "last", shown first.
        out_dir: where the PNGs go, one folder per run and checkpoint (default: a temporary folder).
        device: where the model runs.
    Returns:
        A Panel with run and checkpoint pickers (first run: `pick_figure_run`'s); `shown` holds the
        `run`, the `checkpoint` and the `paths` of the figures; each pair is drawn once.
    """
    from .analysis import figures_for_run

    logs = read_logs(runs_root)
    configs = read_configs(logs)
    # runs with a decoder (figures 3-4 read it), as `pick_figure_run` selects them
    candidates = sorted(d for d in logs["run_dir"].unique() if configs.get(d, {}).get("pooling") not in (None, "cls"))
    if not candidates:
        raise MamikitError(f"{runs_root}: no run with a decoder; figures 3-4 need one")
    names = _run_names(logs, candidates)
    out_dir = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="mamikit-figures-"))
    drawn: dict[tuple[str, str], list[Path]] = {}
    c = {"run": W.Dropdown(options=[(names[d], d) for d in candidates], value=pick_figure_run(logs, configs),
                           description="run"),
         "checkpoint": W.ToggleButtons(options=["best", "last"], value=checkpoint, description="checkpoint")}

    def draw():
        key = (c["run"].value, c["checkpoint"].value)
        if key not in drawn:
            folder = out_dir / names[key[0]].replace("/", "_") / key[1]
            drawn[key] = figures_for_run(key[0], folder, data_root, features_root, checkpoint=key[1], device=device)
        panel.show(_heading(f"{names[key[0]]}, {key[1]} checkpoint"), *drawn[key], run=key[0], checkpoint=key[1],
                   paths=drawn[key])

    panel = Panel(c, [W.HBox([c["run"], c["checkpoint"]])], draw)
    panel.redraw_on("run", "checkpoint")
    panel.refresh()
    return panel


# ----------------------------------------------------------------------------- 09: one meme


def uploaded_files(value) -> list[tuple[str, bytes]]:
    """A FileUpload's `value` as (file name, content) pairs, in both of its forms.

    ipywidgets 8 gives a tuple of dicts with "name" and "content" (a memoryview);
    ipywidgets 7 a dict from file name to {"metadata": ..., "content": bytes}.
    """
    if isinstance(value, dict):
        return [(str(name), bytes(file["content"])) for name, file in value.items()]
    return [(str(file["name"]), bytes(file["content"])) for file in value or ()]


def prediction_panel(runs_root, data_root, features_root=None, checkpoint: str = "best",
                     device: str = "auto") -> Panel:
    """Classify an uploaded image or a test meme with a chosen run; the caption can be typed or edited.

    Picking a run, checkpoint, test meme or uploading an image predicts at once; "predict" re-runs
    with the caption as edited. Shows the meme, its label probabilities and the decoder's
    cross-attention split per encoder (`predict_meme`).

    Args:
        runs_root: the runs folder; the run shown first has the best dev score of the official Task A.
        data_root: the data folder whose primary test memes can be picked.
        features_root: the feature store, when it moved since training (default: the run's own).
        checkpoint: "best" or "last", shown first.
        device: where the backbones and model run.
    Returns:
        A Panel; `shown` holds the `predict_meme` result plus the `source` ("test" or "upload"),
        the meme `id` (test) and the `text` used.
    """
    from .predict import predict_meme

    logs = read_logs(runs_root)
    run_dirs = [d for d in logs["run_dir"].unique() if (Path(d) / "checkpoints").is_dir()]
    if not run_dirs:
        raise MamikitError(f"{runs_root}: no run with a checkpoint")
    maxes = run_max_scores(logs)
    dev = maxes[(maxes["split"] == "dev") & (maxes["task"] == official_task_names()[0])].set_index("run_dir")["max"]
    names = _run_names(logs, run_dirs)
    primary = primary_dataset()
    test = load_datasets(data_root, [primary])[primary].splits["test"].set_index("id", drop=False)
    if test.empty:
        raise MamikitError(f"{data_root}: no {primary} test memes to pick")
    upload_dir = Path(tempfile.mkdtemp(prefix="mamikit-upload-"))
    atexit.register(shutil.rmtree, upload_dir, True)  # the uploads go with the kernel
    memes = [(f"{m}: {str(t)[:40]}", m) for m, t in zip(test["id"], test["text"])]
    c = {"run": W.Dropdown(options=[(names[d], d) for d in sorted(run_dirs)],
                           value=max(run_dirs, key=lambda d: (dev.get(d, -np.inf), d)), description="run"),
         "checkpoint": W.ToggleButtons(options=["best", "last"], value=checkpoint, description="checkpoint"),
         "meme": W.Dropdown(options=memes, value=memes[0][1], description="test meme"),
         "upload": W.FileUpload(accept="image/*", multiple=False, description="upload image"),
         "text": W.Textarea(value=str(test["text"].iloc[0]), description="caption", layout=W.Layout(width="60%")),
         "predict": W.Button(description="predict", button_style="primary")}
    source = {"image": test["image"].iloc[0], "kind": "test", "id": test["id"].iloc[0]}

    def draw():
        # an unreadable upload is refused before the model loads
        text, image = c["text"].value, open_image_rgb(source["image"])
        result = predict_meme(c["run"].value, image, text, checkpoint=c["checkpoint"].value, device=device,
                              features_root=features_root)
        where = f"test meme {source['id']}" if source["kind"] == "test" else "uploaded image"
        title = f"{where}: experiment {result['experiment']}, {result['checkpoint']} checkpoint"
        panel.show(image, f"<p><b>{html.escape(text)}</b></p>",
                   plot_prediction(result["probabilities"], result["attention_by_encoder"], title),
                   **result, source=source["kind"], id=source["id"], text=text)

    def pick_meme(change):
        if change["new"] is None:  # cleared by an upload
            return
        source.update(image=test.at[change["new"], "image"], kind="test", id=change["new"])
        with panel.hold():
            c["text"].value = str(test.at[change["new"], "text"])
        panel.refresh()

    def uploaded(change):
        files = uploaded_files(change["new"])
        if not files:
            return
        name, content = files[0]
        path = upload_dir / f"upload{len(list(upload_dir.iterdir()))}{Path(name).suffix.lower() or '.png'}"
        path.write_bytes(content)
        source.update(image=str(path), kind="upload", id=None)
        with panel.hold():
            c["meme"].value = None  # so that picking any test meme, the last one too, switches back
        panel.refresh()

    panel = Panel(c, [W.HBox([c["run"], c["checkpoint"]]), W.HBox([c["meme"], c["upload"]]),
                      W.HBox([c["text"], c["predict"]])], draw)
    panel.redraw_on("run", "checkpoint")
    c["meme"].observe(pick_meme, names="value")
    c["upload"].observe(uploaded, names="value")
    c["predict"].on_click(panel.refresh)
    panel.refresh()
    return panel
