"""Synthetic MAMI- and FBHM-like meme sets in the official layouts (demo data for paper section 4).

The demo profile has no licensed data, so mamikit writes its own memes: real
JPEG (MAMI) and PNG (FBHM) images carrying a rendered caption, with the CSV /
JSONL files of :mod:`mamikit.data`'s layouts. A set is a pure function of the
seed (byte-identical files for the same seed and sizes).

Ground truth (hidden factors per meme)
--------------------------------------
Image cues live in colour and texture, because the demo's randomly initialised
ViT keeps colour but hardly shape; text cues live in word meaning, because the
demo's text model is the real all-MiniLM-L6-v2.

- ``tone`` (image only): a warm red background = hostile, a cool blue one =
  friendly (grey "photo" shapes on top carry no signal).
- ``subject`` (text only): the caption is about women ("my wife", "girls",
  ...) or about something else ("my cat", "the printer", ...).
- MAMI ``misogynous`` (pair): women subject AND hostile tone. Half the memes
  are misogynous; of the others 40% are benign confounders (women subject over
  a friendly image; half of them reuse, word for word, the caption of a
  misogynous meme, so the same caption over a different image flips the
  label), 30% are hostile images about something else, 30% neither.
- Sub-labels, only on misogynous memes, drawn independently (overlapping)
  with prevalences shaming 0.25, stereotype 0.55, objectification 0.45,
  violence 0.20 (MAMI's training set: about 0.25, 0.56, 0.44, 0.19):
    * ``shaming`` (text): a body-shaming phrase, used by no other meme.
    * ``objectification`` (image): lime-green checkered patches, on no other meme.
    * ``stereotype`` (pair): a stereotype phrase; confounders use such phrases
      too (probability 0.55), so the background decides.
    * ``violence`` (pair): a violent phrase; confounders too (0.20).
- FBHM ``hateful`` (pair) shares the hidden factors: a caption about a target
  group (women, a third of them, with MAMI's stereotype / shaming phrases; or
  other groups with hostile phrases) over a hostile warm image. 40% hateful;
  of the rest 45% confounders (group caption, friendly image, 60% of them
  copying a hateful caption), 30% hostile images about something else.
- Label noise: the gold ``misogynous`` / ``hateful`` flips with probability
  0.08; on memes whose gold is misogynous each sub-label flips with 0.05; a
  meme whose gold flipped to not misogynous has no sub-labels (so every noisy
  row stays consistent).
- ``training.csv`` also holds ``n_mami // 100`` deliberately inconsistent rows
  (a sub-label set while misogynous is 0, as in the real MAMI data);
  :func:`mamikit.data.load_datasets` drops and counts them.

Best achievable scores (ceilings)
---------------------------------
The noise-free rule (predict the hidden label) scored against the noisy gold,
from :func:`ceilings` with 200,000 memes (``EXPECTED_CEILINGS``):

=====================  ======  =============================================
score                  value   rule
=====================  ======  =============================================
Task_A                 0.921   misogynous = women subject AND warm image
Task_B                 0.931   the sub-label latents (official weighted scoreB;
                               per label: shaming 0.92, stereotype 0.94,
                               objectification 0.94, violence 0.91)
Hateful                0.917   hateful = target group AND warm image
Task_A, text only      0.742   misogynous = women subject
Task_A, image only     0.789   misogynous = warm image
=====================  ======  =============================================

A model that scores near the single-modality lines has used one modality; the
gap up to the first line is what fusing image and text is worth.

Default sizes (demo): 600 MAMI training memes (6 of them inconsistent), 300
MAMI test memes, 600 FBHM memes (500 in ``train.jsonl``, 100 in
``dev_seen.jsonl``). Images are 192-288 pixels a side.

One-modality sets (section 6's more datasets): :func:`generate_single` writes
a dataset of mamikit/tasks.json's "splits" layout (``train``, ``dev``,
``test`` as JSONL or CSV) holding text only or images only. Text only
(``HSText``): a caption about a target group (women or another group) with a
hostile, shaming, stereotype or violent phrase is hateful (40%); half of
the others are confounders, the same targets with a neutral phrase, so the
label rests on what is said, not on who; a further label, where the dataset
declares one, is "hateful and about women". Image only: the warm background
is the label, no caption drawn. Gold flips with probability 0.05.

:func:`ensure` keeps a whole set and rewrites an unfinished one (a killed
writer, a deleted file), so a notebook can call it on every run. Longer than
mamikit's usual module (about 550 lines): the generator, its documented
ground truth and the check of a written set belong together.
"""

from __future__ import annotations

import colorsys
import io
import json
import shutil
import time
from functools import lru_cache
from pathlib import Path

import numpy as np

from .metrics import score_a, score_b
from .utils import MamikitError, atomic_write, write_json

DEFAULT_SIZES = {"n_mami": 600, "n_mami_test": 300, "n_fbhm": 600}
MARKER = ".mamikit-synthetic.json"  # marks a folder this module may overwrite
SUB_LABELS = ("shaming", "stereotype", "objectification", "violence")
SUB_PREVALENCE = {"shaming": 0.25, "stereotype": 0.55, "objectification": 0.45, "violence": 0.20}
P_MISOGYNOUS = 0.5
P_HATEFUL = 0.4
NOISE_MAIN = 0.08  # flip rate of misogynous / hateful
NOISE_SUB = 0.05  # flip rate of each sub-label on gold-misogynous memes
P_COPY_MAMI = 0.5  # share of MAMI confounders that reuse a misogynous caption
P_COPY_FBHM = 0.6  # share of FBHM confounders that reuse a hateful caption

EXPECTED_CEILINGS = {
    "Task_A": 0.921,
    "Task_B": 0.931,
    "Hateful": 0.917,
    "Task_A_text_only": 0.742,
    "Task_A_image_only": 0.789,
}

WOMEN = ["she", "my wife", "women", "my girlfriend", "girls", "her", "ladies", "my sister", "the girl next door",
         "my ex", "a woman", "my mother in law"]
OTHERS = ["my cat", "my boss", "monday morning", "the printer", "my code", "the weather", "my dog", "the bus",
          "my laptop", "the wifi", "this pizza", "my phone", "traffic", "homework", "the neighbour's dog"]
GROUPS = ["those people", "the new neighbours", "that crowd", "the other party", "tourists", "these foreigners",
          "the people next door"]
NEUTRAL = ["is late again", "made my whole day", "never works on mondays", "is the best thing ever",
           "ruined my morning", "deserves a medal", "is my favourite", "just fell asleep", "wants more coffee",
           "forgot the password again", "is on holiday", "found the remote", "won the game", "is always hungry",
           "took a great photo"]
SHAMING = ["is too fat for that dress", "looks old and ugly without makeup", "should really lose some weight",
           "has a face nobody wants to see", "is way too skinny to be pretty", "wears makeup to hide that ugly face"]
STEREOTYPE = ["belongs in the kitchen", "cannot park a car", "spent all my money on shoes again",
              "should make me a sandwich", "is too emotional to be the boss", "only talks about shopping"]
VIOLENCE = ["deserves a slap", "needs to be put in her place by force", "should get hit for that",
            "will learn when someone punches her"]
HOSTILE = ["ruin everything", "do not belong here", "are all the same", "should be kicked out",
           "are a plague on this town", "are worse than rats"]
PREFIXES = ["", "", "", "when ", "me: ", "pov: ", "nobody: ", "fun fact: "]
SUFFIXES = ["", "", "", " lol", "!!", " #relatable", " ...", " (true story)"]


# ----------------------------------------------------------------------------- hidden factors


def sample_mami(rng: np.random.Generator, n: int, n_inconsistent: int = 0) -> dict[str, np.ndarray]:
    """Hidden factors and noisy gold labels of `n` MAMI-like memes (no rendering).

    Returns arrays of length n: ``women``, ``warm`` (bool), latent labels
    ``latent_<label>``, text/image cues ``cue_<label>``, ``copy_of`` (index of
    the meme whose caption a confounder reuses, -1 if none), gold ``<label>``
    (int 0/1) and ``inconsistent`` (bool).
    """
    mis = rng.random(n) < P_MISOGYNOUS
    u = rng.random(n)
    confounder = ~mis & (u < 0.4)
    women = mis | confounder
    warm = mis | (~mis & (u >= 0.4) & (u < 0.7))
    out: dict[str, np.ndarray] = {"women": women, "warm": warm, "latent_misogynous": mis}
    for lab in SUB_LABELS:
        out[f"latent_{lab}"] = mis & (rng.random(n) < SUB_PREVALENCE[lab])
    out["cue_shaming"] = out["latent_shaming"].copy()
    out["cue_objectification"] = out["latent_objectification"].copy()
    out["cue_stereotype"] = out["latent_stereotype"] | (confounder & (rng.random(n) < SUB_PREVALENCE["stereotype"]))
    out["cue_violence"] = out["latent_violence"] | (confounder & (rng.random(n) < SUB_PREVALENCE["violence"]))
    # benign confounders reusing the caption of a misogynous meme without a shaming phrase
    copy_of = np.full(n, -1)
    sources = np.flatnonzero(mis & ~out["cue_shaming"])
    copies = confounder & (rng.random(n) < P_COPY_MAMI)
    picks = rng.integers(0, max(1, len(sources)), n)
    if len(sources):
        copy_of[copies] = sources[picks[copies]]
        for lab in ("stereotype", "violence"):
            out[f"cue_{lab}"][copies] = out[f"cue_{lab}"][copy_of[copies]]
    out["copy_of"] = copy_of
    gold_mis = mis ^ (rng.random(n) < NOISE_MAIN)
    out["misogynous"] = gold_mis.astype(np.int64)
    for lab in SUB_LABELS:
        out[lab] = (gold_mis & (out[f"latent_{lab}"] ^ (rng.random(n) < NOISE_SUB))).astype(np.int64)
    # deliberately inconsistent rows, as the real training set has a few
    inconsistent = np.zeros(n, dtype=bool)
    candidates = np.flatnonzero(gold_mis == 0)
    k = min(n_inconsistent, len(candidates))
    if k:
        chosen = rng.choice(candidates, size=k, replace=False)
        labs = rng.integers(0, len(SUB_LABELS), k)
        for i, j in zip(chosen, labs):
            out[SUB_LABELS[j]][i] = 1
        inconsistent[chosen] = True
    out["inconsistent"] = inconsistent
    return out


def sample_fbhm(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Hidden factors and noisy gold of `n` FBHM-like memes: ``group``, ``warm``, ``women``, ``latent_hateful``,
    ``hateful``, ``copy_of``."""
    hate = rng.random(n) < P_HATEFUL
    u = rng.random(n)
    confounder = ~hate & (u < 0.45)
    group = hate | confounder
    warm = hate | (~hate & (u >= 0.45) & (u < 0.75))
    women = group & (rng.random(n) < 1 / 3)
    copy_of = np.full(n, -1)
    sources = np.flatnonzero(hate)
    copies = confounder & (rng.random(n) < P_COPY_FBHM)
    picks = rng.integers(0, max(1, len(sources)), n)
    if len(sources):
        copy_of[copies] = sources[picks[copies]]
        women[copies] = women[copy_of[copies]]
    gold = hate ^ (rng.random(n) < NOISE_MAIN)
    return {"group": group, "warm": warm, "women": women, "latent_hateful": hate, "copy_of": copy_of,
            "hateful": gold.astype(np.int64)}


def ceilings(seed: int = 0, n: int = 200_000) -> dict[str, float]:
    """Scores of the noise-free rules against the noisy gold labels, from `n` sampled memes.

    Keys as in ``EXPECTED_CEILINGS``; per sub-label Task B terms are added as ``Task_B_<label>``.
    """
    mami = sample_mami(np.random.default_rng(seed), n)
    gold_b = np.stack([mami[lab] for lab in SUB_LABELS], axis=1)  # (n, 4)
    rule_b = np.stack([mami[f"latent_{lab}"] for lab in SUB_LABELS], axis=1).astype(np.int64)
    out = {
        "Task_A": score_a(mami["misogynous"], mami["latent_misogynous"].astype(np.int64)),
        "Task_B": score_b(gold_b, rule_b),
        "Task_A_text_only": score_a(mami["misogynous"], mami["women"].astype(np.int64)),
        "Task_A_image_only": score_a(mami["misogynous"], mami["warm"].astype(np.int64)),
    }
    for j, lab in enumerate(SUB_LABELS):
        out[f"Task_B_{lab}"] = score_a(gold_b[:, j], rule_b[:, j])
    fbhm = sample_fbhm(np.random.default_rng(seed + 1), n)
    out["Hateful"] = score_a(fbhm["hateful"], fbhm["latent_hateful"].astype(np.int64))
    return out


# ----------------------------------------------------------------------------- captions


def _pick(rng: np.random.Generator, words: list[str]) -> str:
    return words[int(rng.integers(len(words)))]


def _caption(rng: np.random.Generator, subject: str, phrases: list[str]) -> str:
    if not phrases:
        phrases = [_pick(rng, NEUTRAL)]
    body = " and ".join(phrases)
    return f"{_pick(rng, PREFIXES)}{subject} {body}{_pick(rng, SUFFIXES)}"


def _mami_captions(rng: np.random.Generator, f: dict[str, np.ndarray]) -> list[str]:
    n = len(f["women"])
    captions: list[str | None] = [None] * n
    for i in range(n):
        if f["copy_of"][i] >= 0:
            continue
        subject = _pick(rng, WOMEN if f["women"][i] else OTHERS)
        phrases = [_pick(rng, words)
                   for lab, words in (("shaming", SHAMING), ("stereotype", STEREOTYPE), ("violence", VIOLENCE))
                   if f[f"cue_{lab}"][i]]
        captions[i] = _caption(rng, subject, phrases)
    for i in range(n):
        if captions[i] is None:
            captions[i] = captions[f["copy_of"][i]]
    return captions  # type: ignore[return-value]


def _fbhm_captions(rng: np.random.Generator, f: dict[str, np.ndarray]) -> list[str]:
    n = len(f["group"])
    captions: list[str | None] = [None] * n
    for i in range(n):
        if f["copy_of"][i] >= 0:
            continue
        if not f["group"][i]:
            captions[i] = _caption(rng, _pick(rng, OTHERS), [])
        elif f["women"][i]:
            phrase = _pick(rng, SHAMING + STEREOTYPE) if f["latent_hateful"][i] else _pick(rng, NEUTRAL)
            captions[i] = _caption(rng, _pick(rng, WOMEN), [phrase])
        else:
            phrase = _pick(rng, HOSTILE) if f["latent_hateful"][i] else _pick(rng, NEUTRAL)
            captions[i] = _caption(rng, _pick(rng, GROUPS), [phrase])
    for i in range(n):
        if captions[i] is None:
            captions[i] = captions[f["copy_of"][i]]
    return captions  # type: ignore[return-value]


# ----------------------------------------------------------------------------- images


@lru_cache(maxsize=16)
def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((h % 360) / 360.0, s, v)) * 255.0


def _wrap(draw, text: str, font, width: int) -> list[str]:
    lines, cur = [], ""
    for word in text.split():
        trial = f"{cur} {word}".strip()
        if cur and draw.textlength(trial, font=font) > width:
            lines.append(cur)
            cur = word
        else:
            cur = trial
    return lines + ([cur] if cur else [])


def render_meme(rng: np.random.Generator, caption: str, warm: bool, patches: bool, fmt: str = "JPEG") -> bytes:
    """One meme image as encoded bytes: coloured background, grey shapes, optional texture patches, caption."""
    from PIL import Image, ImageDraw

    w, h = (int(v) for v in rng.integers(192, 289, 2))
    hue = rng.uniform(-15, 15) if warm else rng.uniform(200, 240)
    base = _hsv(hue, rng.uniform(0.5, 0.85), rng.uniform(0.55, 0.9))  # (3,)
    ramp = 1.0 + rng.uniform(-0.2, 0.2) * (np.linspace(-1, 1, h)[:, None, None])  # (H, 1, 1) vertical light gradient
    # (H, W, 3) coarse grain
    grain = rng.normal(0, 8, ((h + 3) // 4, (w + 3) // 4, 3)).repeat(4, 0).repeat(4, 1)[:h, :w]
    arr = base[None, None, :] * ramp + grain  # (H, W, 3)
    im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(2, 5))):  # grey "photo" shapes: no signal, only clutter
        x0, y0 = int(rng.integers(0, w * 3 // 4)), int(rng.integers(h // 5, h * 3 // 4))
        x1, y1 = x0 + int(rng.integers(w // 10, w // 4)), y0 + int(rng.integers(h // 10, h // 4))
        grey = int(rng.integers(30, 226))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=(grey, grey, grey))
    if patches:  # lime checkered texture patches: the objectification cue
        for _ in range(int(rng.integers(3, 6))):
            side = int(rng.integers(min(w, h) // 5, min(w, h) // 3))
            x0, y0 = int(rng.integers(0, w - side)), int(rng.integers(0, h - side))
            cell = int(rng.integers(5, 10))
            light, dark = _hsv(rng.uniform(75, 95), 0.9, 0.95), _hsv(rng.uniform(75, 95), 0.9, 0.55)
            yy, xx = np.mgrid[0:side, 0:side]
            checker = ((yy // cell + xx // cell) % 2 == 0)[..., None]  # (S, S, 1)
            tile = np.where(checker, light, dark).astype(np.uint8)  # (S, S, 3)
            im.paste(Image.fromarray(tile, "RGB"), (x0, y0))
        draw = ImageDraw.Draw(im)
    font = _font(max(12, w // 13))
    lines = _wrap(draw, caption.upper(), font, w - 12)
    step = font.size + 4
    top = 4 if rng.random() < 0.5 else max(4, h - 6 - step * len(lines))
    for k, line in enumerate(lines):
        tw = draw.textlength(line, font=font)
        draw.text(((w - tw) / 2, top + k * step), line, font=font, fill=(255, 255, 255), stroke_width=2,
                  stroke_fill=(0, 0, 0))
    buf = io.BytesIO()
    if fmt == "JPEG":
        im.save(buf, format="JPEG", quality=90, optimize=False)
    else:
        im.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


# ----------------------------------------------------------------------------- writing the layouts


def _streams(seed: int, part: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent (factors, rendering) generators for one part of the set."""
    a, b = np.random.SeedSequence([seed, part]).spawn(2)
    return np.random.default_rng(a), np.random.default_rng(b)


def _sizes(n_mami, n_mami_test, n_fbhm) -> tuple[int, int, int]:
    """The three meme counts, None meaning the demo's default."""
    sizes = tuple(DEFAULT_SIZES[k] if v is None else int(v) for k, v in
                  (("n_mami", n_mami), ("n_mami_test", n_mami_test), ("n_fbhm", n_fbhm)))
    if min(sizes) < 0:
        raise MamikitError("meme counts must be >= 0")
    return sizes


def _fbhm_dev(n_fbhm: int) -> int:
    """FBHM memes that go to dev_seen.jsonl (a sixth)."""
    return n_fbhm // 6 if n_fbhm >= 6 else 0


def _layout(out: Path, n_mami: int, n_mami_test: int, n_fbhm: int) -> dict[str, Path]:
    """The data files a set of these sizes has, by name (`generate`'s "paths")."""
    files = {}
    if n_mami:
        files["MAMI_training"] = out / "MAMI" / "TRAINING" / "training.csv"
    if n_mami_test:
        files["MAMI_test"] = out / "MAMI" / "test" / "Test.csv"
        files["MAMI_test_labels"] = out / "MAMI" / "test_labels.txt"
    n_dev = _fbhm_dev(n_fbhm)
    for stem, n in (("train", n_fbhm - n_dev), ("dev_seen", n_dev)):
        if n:
            files[f"FBHM_{stem}"] = out / "FBHM" / f"{stem}.jsonl"
    return files


def _prepare(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    present = [out / d for d in ("MAMI", "FBHM") if (out / d).exists()]
    if present and not (out / MARKER).exists():
        raise MamikitError(f"{out}: holds {', '.join(p.name for p in present)}/ not written by `mamikit synth`; "
                           "refusing to overwrite it")
    for p in present:
        shutil.rmtree(p)
    write_json(out / MARKER, {"generator": "mamikit.synthetic", "complete": False})


def _write_images(folder: Path, names: list[str], captions: list[str], warm, patches, rng, fmt: str, desc: str,
                  progress: bool) -> None:
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    for i in tqdm(range(len(names)), desc=desc, disable=not progress, leave=False):
        data = render_meme(rng, captions[i], bool(warm[i]), bool(patches[i]), fmt)
        (folder / names[i]).write_bytes(data)


def generate(out, seed: int = 1, n_mami: int | None = None, n_mami_test: int | None = None,
             n_fbhm: int | None = None, progress: bool = True) -> dict:
    """Write a synthetic MAMI + FBHM set under `out` in the official layouts.

    Args:
        out: data folder; MAMI/ and FBHM/ are (re)written there (only over a previous synthetic set).
        seed: the set is a pure function of the seed and the sizes.
        n_mami: MAMI training memes (default 600; 1% of them deliberately inconsistent).
        n_mami_test: MAMI test memes (default 300).
        n_fbhm: FBHM memes, a sixth of them in dev_seen.jsonl (default 600).
    Returns:
        {"root", "seed", "counts", "paths", "ceilings" (noise-free rules on this set), "seconds"}.
    """
    start = time.perf_counter()
    n_mami, n_mami_test, n_fbhm = _sizes(n_mami, n_mami_test, n_fbhm)
    out = Path(out)
    _prepare(out)
    counts: dict[str, dict[str, int]] = {}
    set_ceilings: dict[str, float] = {}
    labels = ("misogynous", *SUB_LABELS)

    # MAMI: unique numeric file names shared out between training and test
    name_rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    numbers = name_rng.choice(np.arange(1, 10 * (n_mami + n_mami_test) + 100), size=n_mami + n_mami_test,
                              replace=False)
    mami_names = [f"{int(k)}.jpg" for k in numbers]
    if n_mami:
        fac_rng, img_rng = _streams(seed, 1)
        f = sample_mami(fac_rng, n_mami, n_inconsistent=n_mami // 100)
        caps = _mami_captions(img_rng, f)
        names = mami_names[:n_mami]
        folder = out / "MAMI" / "TRAINING"
        _write_images(folder, names, caps, f["warm"], f["cue_objectification"], img_rng, "JPEG", "MAMI training",
                      progress)
        with atomic_write(folder / "training.csv", "w") as fh:
            fh.write("file_name\t" + "\t".join(labels) + "\tText Transcription\n")
            for i, name in enumerate(names):
                fh.write(f"{name}\t" + "\t".join(str(int(f[lab][i])) for lab in labels) + f"\t{caps[i]}\n")
        ok = ~f["inconsistent"]
        counts["MAMI"] = {"training": n_mami, "inconsistent": int(f["inconsistent"].sum()), "usable": int(ok.sum())}
        set_ceilings["MAMI_train_Task_A"] = score_a(f["misogynous"][ok], f["latent_misogynous"][ok].astype(np.int64))
    if n_mami_test:
        fac_rng, img_rng = _streams(seed, 2)
        f = sample_mami(fac_rng, n_mami_test)
        caps = _mami_captions(img_rng, f)
        names = mami_names[n_mami:]
        folder = out / "MAMI" / "test"
        _write_images(folder, names, caps, f["warm"], f["cue_objectification"], img_rng, "JPEG", "MAMI test", progress)
        with atomic_write(folder / "Test.csv", "w") as fh:
            fh.write("file_name\tText Transcription\n")
            for i, name in enumerate(names):
                fh.write(f"{name}\t{caps[i]}\n")
        with atomic_write(out / "MAMI" / "test_labels.txt", "w") as fh:
            for i, name in enumerate(names):
                fh.write(f"{name}\t" + "\t".join(str(int(f[lab][i])) for lab in labels) + "\n")
        counts.setdefault("MAMI", {})["test"] = n_mami_test
        gold_b = np.stack([f[lab] for lab in SUB_LABELS], 1)
        rule_b = np.stack([f[f"latent_{lab}"] for lab in SUB_LABELS], 1).astype(np.int64)
        set_ceilings["MAMI_test_Task_A"] = score_a(f["misogynous"], f["latent_misogynous"].astype(np.int64))
        set_ceilings["MAMI_test_Task_B"] = score_b(gold_b, rule_b)
    if n_fbhm:
        fac_rng, img_rng = _streams(seed, 3)
        f = sample_fbhm(fac_rng, n_fbhm)
        caps = _fbhm_captions(img_rng, f)
        ids = [int(k) for k in img_rng.choice(np.arange(10000, 100000), size=n_fbhm, replace=False)]
        names = [f"{k:05d}.png" for k in ids]
        folder = out / "FBHM"
        _write_images(folder / "img", names, caps, f["warm"], np.zeros(n_fbhm, bool), img_rng, "PNG", "FBHM", progress)
        n_dev = _fbhm_dev(n_fbhm)
        parts = {"train": range(0, n_fbhm - n_dev), "dev_seen": range(n_fbhm - n_dev, n_fbhm)}
        counts["FBHM"] = {}
        for stem, idx in parts.items():
            if not len(idx):
                continue
            with atomic_write(folder / f"{stem}.jsonl", "w") as fh:
                for i in idx:
                    fh.write(json.dumps({"id": ids[i], "img": f"img/{names[i]}", "label": int(f["hateful"][i]),
                                         "text": caps[i]}) + "\n")
            counts["FBHM"][stem] = len(idx)
        set_ceilings["FBHM_Hateful"] = score_a(f["hateful"], f["latent_hateful"].astype(np.int64))
    paths = {key: str(path) for key, path in _layout(out, n_mami, n_mami_test, n_fbhm).items()}
    meta = {"generator": "mamikit.synthetic", "complete": True, "seed": seed, "counts": counts,
            "ceilings_this_set": set_ceilings, "expected_ceilings": EXPECTED_CEILINGS}
    write_json(out / MARKER, meta)
    return {"root": str(out), "seed": seed, "counts": counts, "paths": paths, "ceilings": set_ceilings,
            "seconds": round(time.perf_counter() - start, 2)}


# ----------------------------------------------------------------------------- one-modality sets ("splits" layout)

P_HATE_TEXT = 0.4  # share of hateful texts in a text-only set
NOISE_SINGLE = 0.05  # gold flip rate of a one-modality set
SINGLE_PARTS = {"train": 0.7, "dev": 0.15, "test": 0.15}  # shares of the split files


def _single_captions(rng: np.random.Generator, hate: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Captions of a text-only set and whether each is about women: hateful ones attack a target, half the others
    name a target neutrally (confounders), the rest are about something else."""
    captions, women = [], np.zeros(len(hate), bool)
    for i, hateful in enumerate(hate):
        about_target = hateful or rng.random() < 0.5
        women[i] = about_target and rng.random() < 0.5
        subject = _pick(rng, WOMEN if women[i] else GROUPS if about_target else OTHERS)
        phrase = _pick(rng, HOSTILE + SHAMING + STEREOTYPE + VIOLENCE) if hateful else _pick(rng, NEUTRAL)
        captions.append(_caption(rng, subject, [phrase]))
    return captions, women


def generate_single(out, name: str = "HSText", seed: int = 1, n: int = 300, modalities=None, fmt: str = "jsonl",
                    progress: bool = False) -> dict:
    """Write a one-modality dataset of mamikit/tasks.json at `out/<name>/` in the "splits" layout.

    Args:
        out: the data folder (beside MAMI/ and FBHM/).
        name: a dataset of the tasks file; its labels name the columns.
        seed: the set is a pure function of the seed, the size and the modalities.
        n: rows over train, dev and test (70/15/15).
        modalities: ("text",) or ("image",); None: the dataset's own (`registry.dataset_modalities`).
        fmt: "jsonl" or "csv" split files.
        progress: a progress bar over the images.
    Returns:
        {"root", "counts" {split: rows}, "paths" {split: file}, "ceiling" (the noise-free rule's score)}.
    """
    from .registry import dataset_labels, dataset_modalities

    modalities = tuple(modalities or dataset_modalities(name))
    if modalities not in (("text",), ("image",)):
        raise MamikitError(f"synthetic {name}: modalities must be ('text',) or ('image',), got {modalities}")
    if fmt not in ("jsonl", "csv"):
        raise MamikitError(f"synthetic {name}: fmt must be 'jsonl' or 'csv', got {fmt!r}")
    if n < 3:
        raise MamikitError(f"synthetic {name}: needs at least 3 rows (train, dev, test), got {n}")
    labels = dataset_labels(name)
    folder = Path(out) / name
    if folder.exists() and not (folder / MARKER).exists():
        raise MamikitError(f"{folder}: not written by mamikit's synthetic generator; refusing to overwrite it")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    write_json(folder / MARKER, {"generator": "mamikit.synthetic", "complete": False})
    fac_rng, img_rng = _streams(seed, 10 if modalities == ("text",) else 11)
    latent = fac_rng.random(n) < (P_HATE_TEXT if modalities == ("text",) else 0.5)
    ids = [f"{name.lower()}{k:05d}" for k in range(n)]
    columns = {"id": ids}
    women = np.zeros(n, bool)
    if modalities == ("text",):
        columns["text"], women = _single_captions(img_rng, latent)
    else:
        names = [f"img/{i}.png" for i in ids]
        _write_images(folder / "img", [p[4:] for p in names], [""] * n, latent, np.zeros(n, bool), img_rng, "PNG",
                      name, progress)
        columns["img"] = names
    gold = latent ^ (fac_rng.random(n) < NOISE_SINGLE)
    for k, label in enumerate(labels):
        columns[label] = (gold if k == 0 else gold & women).astype(np.int64)
    cut = np.cumsum([0] + [round(share * n) for share in SINGLE_PARTS.values()])
    cut[-1] = n
    paths, counts = {}, {}
    for (split, _), a, b in zip(SINGLE_PARTS.items(), cut[:-1], cut[1:]):
        path = folder / f"{split}.{fmt}"
        with atomic_write(path, "w") as fh:
            if fmt == "csv":
                import csv

                writer = csv.writer(fh, lineterminator="\n")
                writer.writerow(list(columns))
                writer.writerows([[columns[c][i] for c in columns] for i in range(a, b)])
            else:
                for i in range(a, b):
                    fh.write(json.dumps({c: (int(v[i]) if isinstance(v, np.ndarray) else v[i])
                                         for c, v in columns.items()}) + "\n")
        paths[split], counts[split] = str(path), int(b - a)
    ceiling = score_a(columns[labels[0]], latent.astype(np.int64))
    write_json(folder / MARKER, {"generator": "mamikit.synthetic", "complete": True, "seed": seed, "n": n,
                                 "modalities": list(modalities), "counts": counts})
    return {"root": str(folder), "counts": counts, "paths": paths, "ceiling": ceiling}


def ensure_single(out, names, seed: int = 1, n: int = 300) -> dict:
    """Make `out` hold the one-modality synthetic sets among `names` (datasets of mamikit/tasks.json, e.g.
    `Settings.datasets()`): each kept when whole with this seed and size, else written anew (`generate_single`).

    The demo's notebook 01 calls it for round 5's text-only dataset; bi-modal names (MAMI, FBHM) are `ensure`'s.
    Returns:
        {dataset: "kept" or "generated"} for the one-modality datasets among `names`.
    """
    from .registry import dataset_modalities, tasks_config

    known = tasks_config()["datasets"]
    actions = {}
    for name in names:
        if name not in known or len(dataset_modalities(name)) != 1:
            continue
        marker = Path(out) / name / MARKER
        try:
            meta = json.loads(marker.read_text(encoding="utf-8")) if marker.exists() else {}
        except (OSError, ValueError):
            meta = {}
        if meta.get("complete") and meta.get("seed") == seed and meta.get("n") == n:
            actions[name] = "kept"
            continue
        generate_single(out, name, seed=seed, n=n)
        actions[name] = "generated"
    return actions


# ----------------------------------------------------------------------------- an unfinished set


def _image_names(path: Path, dataset: str) -> list[str]:
    """Image file names a data file lists, relative to its dataset folder."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if dataset == "FBHM":
        return [json.loads(line)["img"] for line in lines if line.strip()]
    folder = "TRAINING" if path.name == "training.csv" else "test"
    start = 0 if path.name == "test_labels.txt" else 1  # the CSVs have a header
    return [f"{folder}/{line.split(chr(9))[0]}" for line in lines[start:] if line.strip()]


def incomplete(out, seed: int = 1, n_mami: int | None = None, n_mami_test: int | None = None,
               n_fbhm: int | None = None) -> str | None:
    """Why `out` does not hold the whole synthetic set `generate` writes with these settings; None when it does.

    Checks the marker (written last, so a killed writer leaves it unfinished),
    the seed and sizes it records, every data file, its number of rows and that
    each image it names is there (not decoded: `mamikit check` does that).
    """
    out = Path(out)
    n_mami, n_mami_test, n_fbhm = _sizes(n_mami, n_mami_test, n_fbhm)
    if not (out / MARKER).exists():
        return "no synthetic set there"
    try:
        meta = json.loads((out / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"{MARKER} unreadable ({exc})"
    if not isinstance(meta, dict) or not meta.get("complete", "counts" in meta):
        return "the writer stopped before the end"
    counts = meta.get("counts") or {}
    had = (counts.get("MAMI", {}).get("training", 0), counts.get("MAMI", {}).get("test", 0),
           sum(counts.get("FBHM", {}).values()))
    if meta.get("seed") != seed or had != (n_mami, n_mami_test, n_fbhm):
        return (f"written with seed {meta.get('seed')} and sizes {had}, "
                f"asked seed {seed} and sizes {(n_mami, n_mami_test, n_fbhm)}")
    n_dev = _fbhm_dev(n_fbhm)
    rows = {"MAMI_training": n_mami, "MAMI_test": n_mami_test, "MAMI_test_labels": n_mami_test,
            "FBHM_train": n_fbhm - n_dev, "FBHM_dev_seen": n_dev}
    for key, path in _layout(out, n_mami, n_mami_test, n_fbhm).items():
        if not path.is_file():
            return f"{path.relative_to(out)} is missing"
        dataset = key.split("_")[0]
        try:
            names = _image_names(path, dataset)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"{path.relative_to(out)} unreadable ({exc})"
        if len(names) != rows[key]:
            return f"{path.relative_to(out)} has {len(names)} rows, not {rows[key]}"
        if key == "MAMI_test_labels":
            continue  # its memes are Test.csv's
        lost = [n for n in names if not (out / dataset / n).is_file() or (out / dataset / n).stat().st_size == 0]
        if lost:
            return f"{len(lost)} images of {path.relative_to(out)} are missing, e.g. {dataset}/{lost[0]}"
    return None


def ensure(out, seed: int = 1, n_mami: int | None = None, n_mami_test: int | None = None, n_fbhm: int | None = None,
           progress: bool = True) -> dict:
    """Make `out` hold the synthetic set of these settings: kept when whole, else (re)written from scratch.

    Args:
        out, seed, n_mami, n_mami_test, n_fbhm, progress: as `generate`.
    Returns:
        `generate`'s info plus "action" ("kept", "generated" or "regenerated") and "reason"
        (why the set there was not kept; "" when kept). A folder holding data that
        `generate` did not write is never touched (MamikitError).
    """
    out = Path(out)
    reason = incomplete(out, seed, n_mami, n_mami_test, n_fbhm)
    if reason is None:
        meta = json.loads((out / MARKER).read_text(encoding="utf-8"))
        paths = {key: str(path) for key, path in _layout(out, *_sizes(n_mami, n_mami_test, n_fbhm)).items()}
        return {"root": str(out), "seed": seed, "counts": meta["counts"], "paths": paths,
                "ceilings": meta.get("ceilings_this_set", {}), "seconds": 0.0, "action": "kept", "reason": ""}
    fresh = not (out / MARKER).exists() and not any((out / d).exists() for d in ("MAMI", "FBHM"))
    info = generate(out, seed, n_mami, n_mami_test, n_fbhm, progress)  # removes the partial set first
    return dict(info, action="generated" if fresh else "regenerated", reason="" if fresh else reason)
