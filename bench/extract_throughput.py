"""Feature extraction throughput (section 3.1 backbones, section 4 feature store).

Compares, per backbone, memes per second end to end (decode + crops +
preprocess + forward + store write, as `extract` runs it) with the forward
pass alone on an already prepared batch, and prints the store's bytes per meme.

    python bench/extract_throughput.py                   # demo profile, 240 synthetic memes, CPU
    python bench/extract_throughput.py --memes 600 --device cuda --batch-size 32
    python bench/extract_throughput.py --data DIR --profile paper
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from mamikit.backbones import load_backbones
from mamikit.data import load_datasets
from mamikit.extraction import extract_frames
from mamikit.profiles import get_profile
from mamikit.store import BACKBONES, FeatureStore
from mamikit.utils import open_image_rgb, pick_device


def _forward_only(bb, frame, batch_size: int, repeats: int, device) -> float:
    """Memes per second of the backbone's forward pass alone on one prepared batch."""
    rows = frame.iloc[:batch_size]
    with torch.inference_mode():
        if bb.name == "text":
            tok = bb.tokenize(rows["text"].tolist())
            run = lambda: bb.forward(tok["input_ids"], tok["attention_mask"])  # noqa: E731
        else:
            prepared = [bb.prepare(open_image_rgb(p)) for p in rows["image"]]
            batch = torch.stack(prepared) if bb.name == "clip" else prepared
            run = lambda: bb.forward(batch)  # noqa: E731
        run()  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return repeats * len(rows) / (time.perf_counter() - start)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="data folder (default: a fresh synthetic set)")
    ap.add_argument("--memes", type=int, default=240, help="synthetic MAMI training memes")
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", type=int, default=4)
    args = ap.parse_args(argv)

    device = pick_device(args.device)
    profile = get_profile(args.profile)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            from mamikit import synthetic

            data = str(Path(tmp) / "data")
            synthetic.generate(data, seed=1, n_mami=args.memes, n_mami_test=0, n_fbhm=0, progress=False)
        loaded = load_datasets(data)
        frames = {name: d.splits for name, d in loaded.items()}
        n = sum(len(f) for splits in frames.values() for f in splits.values())

        # Load every backbone once first, so that end-to-end times exclude one-off imports.
        load_backbones(profile, device=device)
        store = Path(tmp) / "store"
        start = time.perf_counter()
        extract_frames(frames, store, profile, batch_size=args.batch_size, device=device, progress=False, workers=args.workers)
        total = time.perf_counter() - start
        fs = FeatureStore(store)

        bbs = load_backbones(profile, device=device)
        frame = max((f for splits in frames.values() for f in splits.values()), key=len)
        print(f"profile {profile.name}, device {device}, {n} memes, batch {args.batch_size}, "
              f"{torch.get_num_threads()} torch threads, {args.workers} decode workers")
        print(f"{'backbone':<9}{'end-to-end memes/s':>20}{'forward memes/s':>17}{'store bytes/meme':>18}")
        for name in BACKBONES:
            entries = [info for _, _, backbone, info in fs.entries() if backbone == name]
            seconds = sum(e["seconds"] for e in entries)
            rows = sum(e["rows"] for e in entries)
            nbytes = sum((store / e["file"]).stat().st_size + (store / e["ids_file"]).stat().st_size for e in entries)
            fwd = _forward_only(bbs[name], frame, args.batch_size, args.repeats, device)
            print(f"{name:<9}{rows / seconds:>20.1f}{fwd:>17.1f}{nbytes / rows:>18.0f}")
        files = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
        print(f"all three: {n / total:.1f} memes/s end to end (incl. backbone loading), {files / n:.0f} store bytes per meme")


if __name__ == "__main__":
    main()
