"""Who trains a run, with what, and who holds it now: the provenance in config.json and the lock of a run directory.

Section 5.1 reports every experiment over several seeds; spread over Colab
sessions, GPUs or a cluster, each run must be trained by exactly one worker
and must say afterwards which software, device and machine produced it. A run
directory holds a lock file (`.lock`, the `filelock` package) while a worker
trains it, and a sidecar `.lock.json` naming that worker (host, pid, since), so
that a second worker can say who is busy with the run and move on.

Locks rely on the filesystem's advisory locks: sound on local disks and on
NFS/Lustre of a cluster, unreliable on synchronised folders such as Google
Drive (use `round --shard` there, which needs no lock).
"""

from __future__ import annotations

import datetime
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from .utils import MamikitError, read_json, write_json

LOCK_FILE = ".lock"  # held (flock) while a worker trains the run
HOLDER_FILE = ".lock.json"  # the holder's host, pid and since; removed on release
LOCK_WAIT = 0.5  # seconds to wait for a held lock: longer than any look (`round --list`), shorter than any run

# distribution names of the libraries whose versions decide a run's numbers
_DISTRIBUTIONS = {"torch": "torch", "transformers": "transformers", "open_clip": "open_clip_torch", "timm": "timm"}


def now() -> str:
    """The current time, ISO 8601 with the UTC offset, to the millisecond."""
    return datetime.datetime.now().astimezone().isoformat(timespec="milliseconds")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_commit(path: Path | None = None) -> str | None:
    """The commit mamikit runs from (suffixed `+dirty` with local changes), or None when nothing says.

    A checkout asks git; an installed package reads what pip recorded of its source (PEP 610's
    direct_url.json): the commit of a git URL, or the checkout it was installed from.
    """
    root = (path or Path(__file__).resolve().parent).parent
    if not (root / ".git").exists():  # an installed package, not a checkout
        return None if path else _installed_commit()
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--",
                                "mamikit"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _installed_commit() -> str | None:
    """The commit pip recorded for the installed mamikit, or that of the folder it was installed from."""
    import json
    from urllib.parse import unquote, urlparse

    try:
        text = metadata.distribution("mamikit").read_text("direct_url.json")
        source = json.loads(text) if text else {}
    except (metadata.PackageNotFoundError, ValueError):
        return None
    commit = source.get("vcs_info", {}).get("commit_id")
    if commit:
        return commit
    url = urlparse(source.get("url", ""))
    if url.scheme == "file" and (Path(unquote(url.path)) / ".git").exists():
        return git_commit(Path(unquote(url.path)) / "mamikit")
    return None


def device_name(device) -> str:
    """A readable name of the device a run trains on (the GPU model on CUDA)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (f"{device.type} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch threads {torch.get_num_threads()})")


def provenance(device="cpu") -> dict:
    """Versions, git commit, device, host, pid and start time of the process about to train a run.

    `finished` is None until the run completes (train() fills it in). A resumed
    run records its latest attempt: `started`, `host` and `pid` are those of the
    process that resumed it, `first_started` is the first attempt's start and
    `attempt` counts the processes that trained it (`runs.open_run_dir` carries
    both over).
    """
    from . import __version__

    started = now()
    return {
        "python": platform.python_version(),
        **{name: _version(dist) for name, dist in _DISTRIBUTIONS.items()},
        "mamikit": __version__,
        "git_commit": git_commit(),
        "device": device_name(device),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": started,
        "finished": None,
        "first_started": started,
        "attempt": 1,
        "argv": list(sys.argv),
    }


# ----------------------------------------------------------------------------- the lock of a run directory


class RunLocked(MamikitError):
    """The run directory is being trained by another worker."""

    def __init__(self, run_dir: Path, holder: dict | None):
        self.run_dir, self.holder = Path(run_dir), holder or {}
        super().__init__(f"{run_dir}: {describe_holder(holder)} is training this run; "
                         "wait for it, or if that process is gone, run again (its lock went with it)")


def describe_holder(holder: dict | None) -> str:
    """`host H pid P since T`, or `another process` when the holder did not say."""
    if not holder:
        return "another process"
    return f"host {holder.get('host', '?')} pid {holder.get('pid', '?')} since {holder.get('since', '?')}"


def read_holder(run_dir) -> dict | None:
    """The holder recorded next to the lock (it may be stale: check with `lock_holder`)."""
    path = Path(run_dir) / HOLDER_FILE
    if not path.exists():
        return None
    try:
        holder = read_json(path)
    except MamikitError:
        return None  # being written, or cut by a kill
    return holder if isinstance(holder, dict) else None


class RunLock:
    """Exclusive right to train one run directory, across processes and hosts sharing a filesystem.

    Use as a context manager; entering raises :class:`RunLocked` naming the
    holder when another worker has it. A killed holder's lock goes with its
    process (the sidecar it leaves behind is then ignored and replaced).
    """

    def __init__(self, run_dir, wait: float = LOCK_WAIT):
        from filelock import FileLock

        self.run_dir = Path(run_dir)
        self.wait = wait
        self._lock = FileLock(self.run_dir / LOCK_FILE, timeout=wait, thread_local=False)

    def __enter__(self) -> "RunLock":
        from filelock import Timeout

        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except Timeout:
            raise RunLocked(self.run_dir, read_holder(self.run_dir)) from None
        write_json(self.run_dir / HOLDER_FILE, {"host": socket.gethostname(), "pid": os.getpid(), "since": now()})
        return self

    def __exit__(self, *exc) -> None:
        try:
            (self.run_dir / HOLDER_FILE).unlink(missing_ok=True)
        finally:
            self._lock.release()


def lock_holder(run_dir) -> dict | None:
    """Who holds the run directory's lock now (host, pid, since), or None when nobody does.

    Probes the lock only when a holder is recorded, so listing runs does not
    stand in a worker's way.
    """
    run_dir = Path(run_dir)
    holder = read_holder(run_dir)
    if holder is None or not run_dir.exists():
        return None
    try:
        with RunLock(run_dir, wait=0):
            return None  # the recorded holder is gone (killed); its lock went with it
    except RunLocked as exc:
        return exc.holder or holder
