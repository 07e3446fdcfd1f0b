"""Tests for mamikit.viz: figures 3 and 4 from small arrays, and the cross-attention aggregation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mamikit import viz

LABELS = ["misogynous", "shaming", "hateful"]


def _png_size(fig) -> tuple[int, int]:
    """The figure's size in pixels as matplotlib renders it (3.11 rounds, earlier versions truncate)."""
    return tuple(int(v) for v in fig.canvas.get_width_height(physical=True))


def _tsne_inputs(n=24, c=3, d=8, seed=0):
    rng = np.random.default_rng(seed)
    gold = (rng.random((n, c)) < 0.4).astype(int)
    gold[:, 2] = -1  # e.g. FBHM's label on the MAMI test set: unknown
    queries = rng.normal(size=(c, d))
    out = rng.normal(size=(n, c, d)) + 2 * gold[..., None].clip(0) * queries[None]
    return out, queries, gold


def test_plot_tsne_png_size_and_query_point(tmp_path):
    out, queries, gold = _tsne_inputs()
    fig = viz.plot_tsne(out, queries, gold, LABELS, path=tmp_path / "tsne.png")
    png = Image.open(tmp_path / "tsne.png").convert("RGB")
    assert png.size == _png_size(fig) == (int(3 * 3.6 * 120), int((3.4 + 0.5) * 120))
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title().split(" (")[0] for ax in axes] == LABELS
    for ax in axes:
        marks = {c.get_label(): c.get_offsets() for c in ax.collections}
        assert marks["class query"].shape == (1, 2) and np.isfinite(marks["class query"]).all()
        assert sum(len(v) for k, v in marks.items() if k != "class query") == 24
    assert set(dict((c.get_label(), 1) for c in axes[2].collections)) == {"unknown", "class query"}
    # The query's colour is in the image (three big markers' worth of pixels).
    pixels = np.asarray(png).reshape(-1, 3).astype(int)
    query_rgb = np.array([int(viz.QUERY[i:i + 2], 16) for i in (1, 3, 5)])
    assert (np.abs(pixels - query_rgb).sum(1) < 12).sum() > 3 * 100


def test_tsne_project_is_seeded_and_puts_query_in_the_same_plane():
    out, queries, _ = _tsne_inputs(n=10)
    a, qa = viz.tsne_project(out[:, 0], queries[0], seed=3)
    b, qb = viz.tsne_project(torch.tensor(out[:, 0]), torch.tensor(queries[0]), seed=3)
    assert a.shape == (10, 2) and qa.shape == (2,)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(qa, qb, rtol=1e-5, atol=1e-5)
    assert viz.tsne_perplexity(11) == pytest.approx(10 / 3) and viz.tsne_perplexity(500) == 30


def test_plot_tsne_rejects_mismatched_shapes():
    out, queries, gold = _tsne_inputs()
    with pytest.raises(ValueError, match="shapes disagree"):
        viz.plot_tsne(out, queries[:2], gold, LABELS)


def test_plot_self_attention_png(tmp_path):
    rng = np.random.default_rng(0)
    attn = rng.dirichlet(np.ones(3), size=(2, 3))  # (layers, C, C)
    fig = viz.plot_self_attention(attn, LABELS, path=tmp_path / "self.png")
    assert Image.open(tmp_path / "self.png").size == _png_size(fig)
    heatmaps = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in heatmaps] == ["layer 1 (input)", "layer 2 (output)"]
    texts = [t.get_text() for t in heatmaps[1].texts]
    assert texts == [f"{v:.2f}" for v in attn[1].ravel()]  # annotated, row-major
    assert [t.get_text() for t in heatmaps[0].get_yticklabels()] == LABELS
    # More layers, wider figure; same height.
    wide = viz.plot_self_attention(rng.dirichlet(np.ones(3), size=(4, 3)), LABELS)
    assert _png_size(wide)[0] > _png_size(fig)[0] and _png_size(wide)[1] == _png_size(fig)[1]


def test_plot_cross_attention_png(tmp_path):
    attn = np.array([[[0.5, 0.2, 0.3]] * 3, [[0.6, 0.1, 0.3]] * 3])  # (layers, C, E)
    fig = viz.plot_cross_attention(attn, LABELS, ["clip", "detr", "text"], path=tmp_path / "cross.png")
    assert Image.open(tmp_path / "cross.png").size == _png_size(fig)
    heatmap = next(ax for ax in fig.axes if ax.get_title().startswith("layer 1"))
    assert [t.get_text() for t in heatmap.get_xticklabels()] == ["CLIP", "DETR", "text"]
    with pytest.raises(ValueError, match="does not match"):
        viz.plot_cross_attention(attn, LABELS, ["clip", "detr"])


def test_aggregate_cross_attention_matches_hand_computation():
    # Two memes, two classes, memory: clip [0, 2), detr [2, 5), text [5, 7).
    segments = {"clip": (0, 2), "detr": (2, 5), "text": (5, 7)}
    mask = np.array([[1, 1, 1, 0, 0, 1, 1], [1, 1, 1, 1, 1, 1, 0]], dtype=bool)
    rng = np.random.default_rng(0)
    layers = []
    for _ in range(2):
        w = rng.random((2, 2, 7))
        w[~mask[:, None, :].repeat(2, 1)] = 0.9  # weight on padding must not count
        layers.append(torch.tensor(w))
    got = viz.aggregate_cross_attention(layers, torch.tensor(mask), segments)
    assert got.shape == (2, 2, 3)
    for li, w in enumerate(layers):
        w = w.numpy()
        for c in range(2):
            m0 = [w[0, c, 0] + w[0, c, 1], w[0, c, 2], w[0, c, 5] + w[0, c, 6]]
            m1 = [w[1, c, 0] + w[1, c, 1], w[1, c, 2] + w[1, c, 3] + w[1, c, 4], w[1, c, 5]]
            np.testing.assert_allclose(got[li, c], (np.array(m0) + np.array(m1)) / 2, rtol=1e-12)
    nomask = viz.aggregate_cross_attention([l.numpy() for l in layers], None, segments)
    np.testing.assert_allclose(nomask[0, 1, 0], (layers[0][0, 1, :2].sum() + layers[0][1, 1, :2].sum()).item() / 2)


def test_plot_samples_grid(tmp_path):
    img = tmp_path / "a.png"
    Image.new("RGB", (64, 40), (200, 30, 30)).save(img)
    arr = np.zeros((30, 30, 3), dtype=np.uint8)
    fig = viz.plot_samples([img, arr, Image.new("RGB", (10, 10))], ["some meme text " * 10, "b", "c"],
                           ["misogynous", None, ""], ncols=2, path=tmp_path / "s.png")
    assert Image.open(tmp_path / "s.png").size == _png_size(fig) == (int(2 * 3.0 * 120), int(2 * 3.5 * 120))
    assert "[misogynous]" in fig.axes[0].get_title()


def test_decoder_views_pick_the_full_task_and_average_labels_over_their_rows():
    rows = [("MAMI", "misogynous"), ("MAMI", "shaming"), ("MAMI", "violence"), ("Task_A", "misogynous"),
            ("Task_B", "shaming"), ("Task_B", "violence")]
    views = viz.decoder_views(rows)
    assert views["labels"] == ["misogynous", "shaming", "violence"]
    assert views["self_task"] == "MAMI" and views["self_rows"] == [0, 1, 2]
    assert views["label_rows"] == {"misogynous": [0, 3], "shaming": [1, 4], "violence": [2, 5]}
    assert views["tsne_rows"] == {"misogynous": 0, "shaming": 1, "violence": 2}
    # Without a task holding every label, figure 4a shows the largest task.
    views = viz.decoder_views(rows[3:])
    assert views["self_task"] == "Task_B" and views["self_rows"] == [1, 2]
    assert views["tsne_rows"] == {"misogynous": 0, "shaming": 1, "violence": 2}


# ----------------------------------------------------------------------------- PNG + PDF


def test_figure_paths_strip_only_the_figure_suffixes(tmp_path):
    assert viz.figure_paths(tmp_path / "box.png") == (tmp_path / "box.png", tmp_path / "box.pdf")
    assert viz.figure_paths(tmp_path / "box.PDF") == (tmp_path / "box.png", tmp_path / "box.pdf")
    assert viz.figure_paths(tmp_path / "box") == (tmp_path / "box.png", tmp_path / "box.pdf")
    assert viz.figure_paths(tmp_path / "30-stage1.v2") == (tmp_path / "30-stage1.v2.png",
                                                          tmp_path / "30-stage1.v2.pdf")


def _writers(tmp_path):
    """Every figure writer of viz with small inputs: name -> a call taking `path`."""
    rng = np.random.default_rng(0)
    out, queries, gold = _tsne_inputs(n=12)
    img = tmp_path / "meme.png"
    Image.new("RGB", (64, 40), (200, 30, 30)).save(img)
    probs = {"Task_A": {"misogynous": 0.8}, "Task_B": {"shaming": 0.2, "violence": 0.6}}
    return {
        "tsne": lambda path: viz.plot_tsne(out, queries, gold, LABELS, path=path),
        "self_attention": lambda path: viz.plot_self_attention(rng.dirichlet(np.ones(3), size=(2, 3)), LABELS,
                                                               path=path),
        "cross_attention": lambda path: viz.plot_cross_attention(np.full((2, 3, 2), 0.5), LABELS, ["clip", "text"],
                                                                 path=path),
        "samples": lambda path: viz.plot_samples([img], ["a meme"], ["misogynous"], path=path),
        "counts": lambda path: viz.plot_counts({"DETR queries": np.array([3, 5, 5, 7])}, path=path),
        "clip_crops": lambda path: viz.plot_clip_crops([img], ["meme"], path=path),
        "prediction": lambda path: viz.plot_prediction(probs, {"clip": 0.5, "detr": 0.2, "text": 0.3}, path=path),
    }


@pytest.mark.parametrize("name", ["tsne", "self_attention", "cross_attention", "samples", "counts", "clip_crops",
                                  "prediction"])
def test_every_writer_saves_png_and_vector_pdf(tmp_path, name):
    fig = _writers(tmp_path)[name](tmp_path / f"{name}.png")
    png, pdf = tmp_path / f"{name}.png", tmp_path / f"{name}.pdf"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(png).size == _png_size(fig)
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF") and data.rstrip().endswith(b"%%EOF")
    # text stays text (vector), in embedded TrueType fonts rather than Type 3 ones
    assert b"/FontFile2" in data and b"/Subtype /Type3" not in data
    assert b"/CreationDate" not in data  # the same figure gives the same bytes


@pytest.mark.smoke
def test_save_figure_returns_both_paths_and_nothing_without_a_path(tmp_path):
    fig = viz.plot_counts({"tokens": np.array([1, 2, 2])})
    assert viz.save_figure(fig, None) is None and list(tmp_path.iterdir()) == []
    assert viz.save_figure(fig, tmp_path / "sub" / "counts") == (tmp_path / "sub" / "counts.png",
                                                                 tmp_path / "sub" / "counts.pdf")
    first = (tmp_path / "sub" / "counts.pdf").read_bytes()
    viz.save_figure(fig, tmp_path / "sub" / "counts.pdf")
    assert (tmp_path / "sub" / "counts.pdf").read_bytes() == first
