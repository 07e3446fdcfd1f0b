"""Figures of section 5.2: t-SNE of decoder outputs (figure 3) and decoder attention (figure 4).

Every function takes plain arrays (numpy, or torch tensors, which are
converted), returns a matplotlib Figure and, given `path`, also writes it as
`<stem>.png` and `<stem>.pdf` (:func:`save_figure`, the one writer of every
mamikit figure: the PDF is vector, for LaTeX papers). Figures are built with
`matplotlib.figure.Figure` rather than pyplot, so nothing depends on a display
or a global backend (headless runs render with Agg) and no figure is left open;
in Jupyter a returned Figure displays inline.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .utils import atomic_write

DPI = 120
NEGATIVE, POSITIVE, UNKNOWN = "#4C72B0", "#D1495B", "#B0B0B0"
QUERY = "#FFB000"  # the class query marker (figure 3's "biggest dot")
ENCODER_NAMES = {"clip": "CLIP", "detr": "DETR", "text": "text"}


def _array(x) -> np.ndarray:
    """A float numpy array from a numpy array, list or (possibly CUDA) torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=float)


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


FIGURE_SUFFIXES = (".png", ".pdf")  # what save_figure writes, and what it strips from a path it is given


def figure_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """The PNG and PDF a figure saved at `path` goes to: `<stem>.png`, `<stem>.pdf`.

    `path` is the stem, or the stem with either suffix ("box.png", "box.pdf" and "box" name the same files).
    """
    path = Path(path)
    stem = path.with_suffix("") if path.suffix.lower() in FIGURE_SUFFIXES else path
    return stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".pdf")


def save_figure(fig, path: str | os.PathLike | None) -> tuple[Path, Path] | None:
    """Write `fig` as `<stem>.png` (at the figure's dpi) and `<stem>.pdf` (vector), atomically.

    The PDF embeds its fonts as TrueType (Type 42), which paper submission checks accept where they refuse
    matplotlib's default Type 3, and carries no creation date, so the same figure gives the same bytes.

    Returns:
        (png path, pdf path), or None when `path` is None (nothing written).
    """
    if path is None:
        return None
    import matplotlib

    png, pdf = figure_paths(path)
    with atomic_write(png, "wb") as fh:
        fig.savefig(fh, format="png", dpi=fig.dpi)
    with matplotlib.rc_context({"pdf.fonttype": 42}), atomic_write(pdf, "wb") as fh:
        fig.savefig(fh, format="pdf", metadata={"CreationDate": None})
    return png, pdf


def _saved(fig, path):
    """`fig` after :func:`save_figure` wrote it to `path` (if any): what every plot function returns."""
    save_figure(fig, path)
    return fig


# ----------------------------------------------------------------------------- figure 3


def tsne_perplexity(n_points: int) -> float:
    """Perplexity for t-SNE: 30 (scikit-learn's default) where there are enough points, else (n-1)/3."""
    return float(min(30.0, max(1.0, (n_points - 1) / 3)))


def tsne_project(decoder_out, query, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Project one class's decoder outputs (N, D) and its query (D,) together with t-SNE.

    Returns:
        (points (N, 2), query point (2,)), from one fit so that they share the plane.
    """
    from sklearn.manifold import TSNE

    x = np.concatenate([_array(decoder_out), _array(query)[None]], 0)  # (N + 1, D)
    tsne = TSNE(n_components=2, perplexity=tsne_perplexity(len(x)), init="pca", random_state=seed)
    y = tsne.fit_transform(x)  # (N + 1, 2)
    return y[:-1], y[-1]


def plot_tsne(decoder_out, queries, gold, labels, seed: int = 0, max_points: int | None = 2000, ncols: int = 3,
              path=None):
    """Figure 3: per class, t-SNE of the decoder outputs with the class's learnt query.

    Args:
        decoder_out: (N, C, D) decoder output per meme and class query.
        queries: (C, D) learnt class query embeddings.
        gold: (N, C) gold labels, 1 positive, 0 negative, -1 unknown (grey).
        labels: the C class names.
        seed: t-SNE (and subsampling) seed.
        max_points: at most this many memes per class (a seeded sample), None for all.
        ncols: subplots per row.
        path: also write `<stem>.png` and `<stem>.pdf` here.
    Returns:
        The Figure; each axes holds one collection labelled "class query".
    """
    out, q, gold = _array(decoder_out), _array(queries), _array(gold)
    n, c = out.shape[:2]
    if q.shape[0] != c or gold.shape != (n, c) or len(labels) != c:
        raise ValueError(f"plot_tsne: shapes disagree: decoder_out {out.shape}, queries {q.shape}, "
                         f"gold {gold.shape}, {len(labels)} labels")
    keep = np.arange(n)
    if max_points is not None and n > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))
    ncols = max(1, min(ncols, c))
    nrows = -(-c // ncols)
    fig = _figure(3.6 * ncols, 3.4 * nrows + 0.5)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for k, label in enumerate(labels):
        ax = axes[k]
        points, qpoint = tsne_project(out[keep, k], q[k], seed=seed)
        g = gold[keep, k]
        for value, color, name in ((-1, UNKNOWN, "unknown"), (0, NEGATIVE, "negative"), (1, POSITIVE, "positive")):
            sel = g == value if value >= 0 else g < 0
            if sel.any():
                ax.scatter(points[sel, 0], points[sel, 1], s=9, c=color, alpha=0.65, linewidths=0, label=name)
        ax.scatter([qpoint[0]], [qpoint[1]], s=260, c=QUERY, edgecolors="black", linewidths=1.2, zorder=5,
                   label="class query")
        ax.set_title(f"{label} (n={len(keep)}, {int((g == 1).sum())} positive)", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("t-SNE 1", fontsize=8)
        ax.set_ylabel("t-SNE 2", fontsize=8)
    for ax in axes[c:]:
        ax.set_visible(False)
    handles = {h.get_label(): h for ax in axes[:c] for h in ax.collections}
    order = [k for k in ("negative", "positive", "unknown", "class query") if k in handles]
    fig.legend([handles[k] for k in order], order, loc="outside lower center", ncols=len(order), markerscale=1.0,
               frameon=False)
    fig.suptitle("t-SNE of decoder outputs per class, with the class's learnt query")
    return _saved(fig, path)


# ----------------------------------------------------------------------------- decoder rows -> figures


def decoder_views(rows) -> dict:
    """Which decoder rows each figure reads, from the (task, label) of each row (``ModelOutput.decoder_rows``).

    With per-task decoding a label has one row in every task holding it. Figure
    4a shows the self-attention within one task: the task holding every label
    decoded (MAMI), else the largest. Figure 4b averages a label's
    cross-attention over all its rows. Figure 3 plots, per label, its row in
    the largest task holding it (MAMI's for MAMI's labels): the decoding
    where the label sees every other label, as in section 5.2, rather than an
    average of vectors from different decodings.

    Returns:
        {"labels": labels in first-seen order, "self_task": the task of figure 4a,
        "self_rows": its row indices, "label_rows": label -> all its row indices,
        "tsne_rows": label -> the one row of figure 3}.
    """
    rows = [tuple(r) for r in rows]
    labels = list(dict.fromkeys(label for _, label in rows))
    by_task: dict = {}
    for i, (task, _) in enumerate(rows):
        by_task.setdefault(task, []).append(i)
    size = {task: len(idx) for task, idx in by_task.items()}
    # max keeps the first of equal sizes: the task listed first in the task table.
    self_task = max(by_task, key=lambda task: size[task])
    label_rows = {label: [i for i, (_, lab) in enumerate(rows) if lab == label] for label in labels}
    tsne_rows = {label: max(idx, key=lambda i: size[rows[i][0]]) for label, idx in label_rows.items()}
    return {"labels": labels, "self_task": self_task, "self_rows": by_task[self_task],
            "label_rows": label_rows, "tsne_rows": tsne_rows}


# ----------------------------------------------------------------------------- figure 4


def aggregate_cross_attention(cross_attn, memory_mask, memory_segments: dict) -> np.ndarray:
    """Cross-attention mass per input encoder, averaged over memes (figure 4b).

    For each meme, a layer's weights are summed over the real (unmasked) memory
    tokens of each encoder; the sums are then averaged over memes.

    Args:
        cross_attn: per decoder layer (B, C, S) head-averaged weights (list or (layers, B, C, S)).
        memory_mask: (B, S) True for real tokens, or None (all real).
        memory_segments: encoder -> (start, end) in the memory; E follows its order.
    Returns:
        (layers, C, E) array.
    """
    import torch

    from .evaluation import attention_by_encoder

    layers = [torch.from_numpy(_array(a)) for a in cross_attn]  # per layer (B, C, S)
    b, _, s = layers[0].shape
    # (B, S)
    mask = torch.ones(b, s, dtype=torch.bool) if memory_mask is None else torch.from_numpy(_array(memory_mask) > 0)
    return attention_by_encoder(layers, mask, memory_segments).mean(0).numpy()  # (B, layers, C, E) -> (layers, C, E)


def _attention_row(attn: np.ndarray, rows: list[str], cols: list[str], title: str, xlabel: str, ylabel: str,
                   cell: float):
    """One heatmap per decoder layer, first (input) layer on the left, one shared colour scale."""
    import seaborn as sns

    layers = attn.shape[0]
    label_room = 0.075 * max(len(r) for r in [*rows, *cols])  # inches for the longest tick label
    fig = _figure(layers * (cell * len(cols) + 0.25) + label_room + 1.3, cell * len(rows) + label_room + 1.1)
    axes = fig.subplots(1, layers, squeeze=False)[0]
    vmin, vmax = float(attn.min()), float(attn.max())
    fmt = ".3f" if vmax - vmin < 0.05 else ".2f"  # near-uniform weights need the third digit
    for i, ax in enumerate(axes):
        sns.heatmap(attn[i], ax=ax, vmin=vmin, vmax=vmax, cmap="viridis", annot=True, fmt=fmt,
                    annot_kws={"fontsize": 7}, cbar=i == layers - 1, xticklabels=cols,
                    yticklabels=rows if i == 0 else False,
                    cbar_kws={"label": "attention weight"})
        name = " (input)" if i == 0 and layers > 1 else " (output)" if i == layers - 1 and layers > 1 else ""
        ax.set_title(f"layer {i + 1}{name}", fontsize=10)
        ax.set_xlabel(xlabel, fontsize=9)
        for tick in ax.get_xticklabels():
            tick.set(rotation=45, ha="right", rotation_mode="anchor", fontsize=8)
        ax.tick_params(axis="y", labelrotation=0, labelsize=8)
    axes[0].set_ylabel(ylabel, fontsize=9)
    fig.suptitle(title)
    return fig


def plot_self_attention(attn, labels, path=None):
    """Figure 4a: average decoder self-attention (class x class) per layer, annotated.

    Args:
        attn: (layers, C, C) weights averaged over memes (rows: attending class).
        labels: the C class names.
        path: also write `<stem>.png` and `<stem>.pdf` here.
    """
    attn = _array(attn)
    if attn.ndim != 3 or attn.shape[1:] != (len(labels), len(labels)):
        raise ValueError(f"plot_self_attention: attn {attn.shape} does not match {len(labels)} labels")
    fig = _attention_row(attn, list(labels), list(labels), "Decoder self-attention, averaged over memes",
                         "attended class (key)", "class query", cell=0.55)
    return _saved(fig, path)


def plot_cross_attention(attn, labels, encoders, path=None):
    """Figure 4b: average decoder cross-attention per layer, summed within each input encoder.

    Args:
        attn: (layers, C, E), e.g. from `aggregate_cross_attention`.
        labels: the C class names.
        encoders: the E encoder names ("clip", "detr", "text").
        path: also write `<stem>.png` and `<stem>.pdf` here.
    """
    attn = _array(attn)
    if attn.ndim != 3 or attn.shape[1:] != (len(labels), len(encoders)):
        raise ValueError(f"plot_cross_attention: attn {attn.shape} does not match {len(labels)} labels x "
                         f"{len(encoders)} encoders")
    cols = [ENCODER_NAMES.get(e, str(e)) for e in encoders]
    fig = _attention_row(attn, list(labels), cols, "Decoder cross-attention per input encoder, averaged over memes",
                         "input encoder", "class query", cell=0.75)
    return _saved(fig, path)


# ----------------------------------------------------------------------------- data


def plot_samples(images, captions, labels=None, ncols: int = 4, thumb: int = 256, path=None):
    """A grid of memes with their (shortened) text and labels, for the data notebook.

    Args:
        images: image paths, PIL images or (H, W, 3) arrays.
        captions: the meme texts.
        labels: per meme a string (e.g. "misogynous, shaming") or None.
        ncols: memes per row.
        thumb: longest side of a thumbnail in pixels.
        path: also write `<stem>.png` and `<stem>.pdf` here.
    """
    import textwrap

    from PIL import Image

    from .utils import open_image_rgb

    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = max(1, -(-n // ncols))
    fig = _figure(3.0 * ncols, 3.5 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes:
        ax.axis("off")
    for k, image in enumerate(images):
        if isinstance(image, (str, os.PathLike)):
            image = open_image_rgb(image)
        elif not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image).astype(np.uint8))
        image = image.copy()
        image.thumbnail((thumb, thumb))
        axes[k].imshow(np.asarray(image))
        text = textwrap.shorten(str(captions[k]), 90, placeholder=" ...")
        tag = f"\n[{labels[k]}]" if labels is not None and labels[k] else ""
        axes[k].set_title("\n".join(textwrap.wrap(text, 34)) + tag, fontsize=7)
    return _saved(fig, path)


# ----------------------------------------------------------------------------- CLIP's inputs and one meme's prediction


def plot_counts(counts: dict, title: str = "", path=None):
    """One histogram per named count per meme (e.g. DETR queries kept, text tokens), one bar per value.

    Args:
        counts: {name: (N,) integer array}.
        title: the figure's title.
        path: also write `<stem>.png` and `<stem>.pdf` here.
    """
    fig = _figure(4.2 * max(1, len(counts)), 3.2)
    for ax, (name, values) in zip(fig.subplots(1, max(1, len(counts)), squeeze=False)[0], counts.items()):
        values = _array(values)
        ax.hist(values, bins=np.arange(values.min(), values.max() + 2) - 0.5 if len(values) else 10, color=NEGATIVE)
        ax.set_xlabel(f"{name} per meme")
        ax.set_ylabel("memes")
    fig.suptitle(title or "counts per meme")
    return _saved(fig, path)


def plot_clip_crops(images, names, notes=None, thumb: int = 256, path=None):
    """Each meme in a row: the whole image and its 2x2 slices, the five inputs of the CLIP backbone (section 3.1).

    Args:
        images: image paths or PIL images.
        names: a row label per meme (e.g. its id).
        notes: per meme a second line under its name (e.g. "7 DETR queries kept"), or None.
        thumb: longest side of a crop in pixels.
        path: also write `<stem>.png` and `<stem>.pdf` here.
    """
    from .backbones import clip_crops
    from .utils import open_image_rgb

    fig = _figure(9.0, 2.0 * len(images) + 0.4)
    axes = fig.subplots(len(images), 5, squeeze=False)
    for r, image in enumerate(images):
        image = open_image_rgb(image) if isinstance(image, (str, os.PathLike)) else image.convert("RGB")
        for k, crop in enumerate(clip_crops(image)):
            crop = crop.copy()
            crop.thumbnail((thumb, thumb))
            axes[r][k].imshow(np.asarray(crop))
            axes[r][k].set_xticks([])
            axes[r][k].set_yticks([])
            axes[r][k].set_title(("whole", "top left", "top right", "bottom left", "bottom right")[k], fontsize=8)
        axes[r][0].set_ylabel(f"{names[r]}\n{notes[r]}" if notes else str(names[r]), fontsize=7)
    fig.suptitle("CLIP inputs: each meme whole and in 2x2 slices")
    return _saved(fig, path)


def plot_prediction(probabilities: dict, attention: dict | None = None, title: str = "", path=None):
    """One meme's label probabilities per task (red where predicted) beside the decoder's attention share per encoder.

    Args:
        probabilities: {task: {label: probability}}, as `predict_meme` returns them.
        attention: {encoder: share of the decoder's cross-attention}, or None (no decoder).
        title: the figure's title.
        path: also write `<stem>.png` and `<stem>.pdf` here.
    """
    from .evaluation import THRESHOLD

    bars = [(f"{task}: {label}", p) for task, probs in probabilities.items() for label, p in probs.items()][::-1]
    fig = _figure(9.0 if attention else 6.0, 0.32 * len(bars) + 1.4)
    axes = fig.subplots(1, 2 if attention else 1, squeeze=False, width_ratios=[2, 1] if attention else None)[0]
    axes[0].barh([n for n, _ in bars], [p for _, p in bars],
                 color=[POSITIVE if p >= THRESHOLD else NEGATIVE for _, p in bars])
    axes[0].axvline(THRESHOLD, color="0.3", linestyle="--", linewidth=1)
    axes[0].set_xlim(0, 1)
    axes[0].set_xlabel(f"probability (red: at least {THRESHOLD}, predicted)")
    axes[0].tick_params(axis="y", labelsize=8)
    if attention:
        axes[1].bar([ENCODER_NAMES.get(e, str(e)) for e in attention], list(attention.values()), color=QUERY)
        axes[1].set_ylim(0, 1)
        axes[1].set_ylabel("share of decoder cross-attention")
    fig.suptitle(title or "label probabilities")
    return _saved(fig, path)
