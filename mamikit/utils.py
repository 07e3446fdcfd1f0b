"""Small shared helpers: atomic writes, locks, safe image opening, seeding, devices.

Every long-running stage of mamikit (extraction, training, reports) writes its
files through :func:`atomic_write` so that a process killed at any moment leaves
either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

# Images larger than this many pixels are refused rather than decoded: a
# decompression bomb (a tiny PNG that expands to gigabytes) must not take a
# long run down. 16k x 16k covers any real meme.
MAX_IMAGE_PIXELS = 16_384 * 16_384
_bomb_warning_silenced = False


class MamikitError(Exception):
    """An error with a message meant for the user (no traceback needed)."""


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temporary file beside `path`; on success fsync and rename it over `path`.

    On an exception the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        fault_point("before_rename")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------- fault injection

FAULT_ENV = "MAMIKIT_FAULT"
_fault_counts: dict[str, int] = {}


# ----------------------------------------------------------------------------- messages

# Every message mamikit has for its user (progress notes, skipped rows, warnings)
# goes to the "mamikit" logger. Its one handler writes through tqdm, so a message
# never tears a progress bar, to the standard error of the moment (notebooks and
# pytest swap it). Command results (`check`, `score`, `predict`, ...) are printed.
LOGGER_NAME = "mamikit"


class _TqdmHandler(logging.Handler):
    """Writes each record with ``tqdm.write`` to the current ``sys.stderr``; inside a `progress_view`, info
    messages go to the view's one line instead."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            if _view is not None and record.levelno < logging.WARNING:
                _view["show"](self.format(record))
                return
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # a message must never stop the work it reports on
            self.handleError(record)


class _MessageFormat(logging.Formatter):
    """Info as the bare message; warnings and errors prefixed with their level (and the command, in the CLI)."""

    prefix = ""  # e.g. "mamikit train: ", so a warning reads like the CLI's one-line errors

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return message if record.levelno < logging.WARNING else f"{self.prefix}{record.levelname.lower()}: {message}"


def get_logger(module: str) -> logging.Logger:
    """The logger of a mamikit module (pass ``__name__``); all of them feed the one "mamikit" channel."""
    return logging.getLogger(module if module.startswith(LOGGER_NAME) else f"{LOGGER_NAME}.{module}")


def set_message_prefix(prefix: str) -> None:
    """Put `prefix` before every warning (the CLI names its command this way)."""
    _MessageFormat.prefix = prefix


def set_verbosity(level: int | str) -> None:
    """Show mamikit's messages from `level` up ("INFO" by default, "WARNING" to keep only problems)."""
    logging.getLogger(LOGGER_NAME).setLevel(level)


def _install_handler() -> None:
    root = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(h, _TqdmHandler) for h in root.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(_MessageFormat())
        root.addHandler(handler)
    if root.level == logging.NOTSET:
        root.setLevel(logging.INFO)


_install_handler()


# ----------------------------------------------------------------------------- a compact view of long work

# The open progress view: where info messages go ("show") and the stage bars it holds; None: none open.
_view: dict | None = None


@contextlib.contextmanager
def progress_view(show: Callable[[str], None]) -> Iterator[None]:
    """A compact view of long work (a round's training): its info messages replace one another on one line.

    While open, every mamikit info message is passed to `show` (e.g. a progress
    bar's ``set_postfix_str``) instead of being written, so a notebook cell keeps
    one line with the latest scores rather than a log line per evaluation;
    warnings and errors are written as always. Inside it, `stage_bar` shows a
    bar for each stage (an evaluation), reused from one stage to the next.
    """
    global _view
    outer, _view = _view, {"show": show, "bars": {}}
    try:
        yield
    finally:
        for bar in _view["bars"].values():
            bar.close()
        _view = outer


@contextlib.contextmanager
def stage_bar(desc: str, total: int, unit: str = "it") -> Iterator[Callable[[int], None]]:
    """Yield `advance(n)` for one stage of work; inside a `progress_view` it moves a bar named `desc`.

    Outside a view (tests, the CLI's `train`, scripts) nothing is shown. The bar
    is created once per view and reset for each stage, so a notebook cell holds
    one evaluation bar however many evaluations it runs. `advance` may be called
    from several threads.
    """
    if _view is None:
        yield lambda n: None
        return
    import threading

    from tqdm.auto import tqdm

    bar = _view["bars"].get(desc)
    if bar is None:
        bar = _view["bars"][desc] = tqdm(total=total, desc=desc, unit=unit, leave=False)
    else:
        bar.reset(total=total)
    lock = threading.Lock()

    def advance(n: int) -> None:
        with lock:
            bar.update(n)

    yield advance


def fault_point(name: str) -> None:
    """Die here on purpose when the environment asks for it (fault-injection tests only).

    `MAMIKIT_FAULT="after_chunk:2"` kills the process with SIGKILL the second
    time the code passes `fault_point("after_chunk")`; several comma-separated
    entries may be given, and `after_chunk:2:hang` stops there (holding any
    lock) until killed from outside. Without the variable this does nothing.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    _fault_counts[name] = count = _fault_counts.get(name, 0) + 1
    for entry in spec.split(","):
        point, _, rest = entry.strip().partition(":")
        nth, _, action = rest.partition(":")
        if point != name or not nth.isdigit() or int(nth) != count:
            continue
        print(f"{FAULT_ENV}: {action or 'kill'} at {name} {count} (pid {os.getpid()})", file=sys.stderr, flush=True)
        if action == "hang":
            while True:
                time.sleep(1)
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
        time.sleep(60)  # the signal is delivered asynchronously; never run past the fault point


def write_json(path: str | os.PathLike, obj) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_write(path, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False, default=str)
        fh.write("\n")


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: str | os.PathLike):
    """Read a JSON file; a missing or malformed file raises MamikitError naming it."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise MamikitError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MamikitError(f"{path}: not valid JSON ({exc})") from None


def append_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    """Append rows to a JSON-lines file with one write and an fsync."""
    if not rows:
        return
    data = "".join(json.dumps(r, sort_keys=False) + "\n" for r in rows)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def open_image_rgb(path: str | os.PathLike):
    """Open an image safely and return it as an RGB PIL image.

    Handles grayscale, palette, CMYK, RGBA (composited on white), animated GIF
    (first frame) and files whose extension lies about their format. Raises
    MamikitError naming the file for anything unreadable, truncated or too large.
    """
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    # PIL warns above the limit (and raises above twice it); every image it warns about is refused
    # below with a message naming the file, so its two-line warning would only be noise.
    # (warnings.catch_warnings is not thread-safe, and images are decoded in threads.)
    global _bomb_warning_silenced
    if not _bomb_warning_silenced:
        import warnings

        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        _bomb_warning_silenced = True
    path = Path(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise MamikitError(f"{path}: image of {w}x{h} pixels exceeds the limit of {MAX_IMAGE_PIXELS}")
            im.seek(0)
            im.load()
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                background = Image.new("RGB", im.size, (255, 255, 255))
                background.paste(im, mask=im.getchannel("A"))
                return background
            return im.convert("RGB")
    except MamikitError:
        raise
    except FileNotFoundError:
        raise MamikitError(f"{path}: image file not found") from None
    except Image.DecompressionBombError as exc:
        raise MamikitError(f"{path}: refused as a decompression bomb ({exc})") from None
    except UnidentifiedImageError:
        raise MamikitError(f"{path}: not an image") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise MamikitError(f"{path}: unreadable image ({exc})") from None


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device): the one place a run's randomness starts."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device (lazily, before CUDA starts)


AMP_DTYPES = ("bfloat16", "float16")  # what MAMIKIT_AMP_DTYPE may name


def amp_dtype():
    """The autocast dtype of mixed precision here: bfloat16 where the GPU supports it, else float16.

    The environment variable MAMIKIT_AMP_DTYPE (``bfloat16`` or ``float16``)
    chooses instead, e.g. float16 with its GradScaler on a GPU that has bfloat16.
    """
    import torch

    chosen = os.environ.get("MAMIKIT_AMP_DTYPE")
    if chosen:
        if chosen not in AMP_DTYPES:
            raise MamikitError(f"MAMIKIT_AMP_DTYPE={chosen!r}: choose one of {', '.join(AMP_DTYPES)}")
        return getattr(torch, chosen)
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16


def pick_device(device: str | None = "auto"):
    """Return a torch.device: `auto` picks CUDA when available, else CPU."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise MamikitError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


def inside(root: str | os.PathLike, relative: str) -> Path:
    """Resolve `relative` under `root`; raise MamikitError if it escapes `root`.

    Used for every file name read from a CSV or JSONL, so that `../x` or an
    absolute path in a data file cannot make mamikit read outside the data folder.
    """
    root = Path(root).resolve()
    if not relative or os.path.isabs(relative) or relative.startswith(("/", "\\")):
        raise MamikitError(f"file name {relative!r} is absolute or empty")
    target = (root / relative).resolve()
    if target != root and root not in target.parents:
        raise MamikitError(f"file name {relative!r} escapes the data folder {root}")
    return target


LOCAL_ENV = "MAMIKIT_LOCAL"  # a local folder for resumable checkpoints and the store's copy (default: temp folder)


def local_root(local_dir: str | None = None) -> Path:
    """The machine's local folder for what a run keeps off the run folder (checkpoints, the store's copy):
    `local_dir` (TrainConfig.local_dir), else $MAMIKIT_LOCAL, else the temp folder."""
    return Path(local_dir or os.environ.get(LOCAL_ENV) or tempfile.gettempdir())
