"""Reliability: killed processes lose nothing, bad or hostile input gives one clear line, same seed same bytes.

Every check here goes through `python -m mamikit ...` in a subprocess, as a
researcher (or a dying Colab session) would. Processes are killed with SIGKILL
at fixed points (`MAMIKIT_FAULT`, see `mamikit.utils.fault_point`) and at
random moments from outside; the re-run must end with exactly the files of an
uninterrupted run. The subprocesses are independent, so a module fixture starts
them in background threads and each test waits for the ones it judges.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")

TRAIN_ARGS = ["--experiment", "02", "--epochs", "2", "--evals-per-epoch", "2", "--accumulation", "2",
              "--batch-size", "16", "--device", "cpu", "--checkpoint-every", "1",  # `last` in the run folder each time
              "--keep-weights", "best+last"]  # a finished run keeps its last weights (what the damaged cases alter)
EXTRACT_ARGS = ["--device", "cpu", "--batch-size", "8", "--chunk-rows", "16"]
TIMEOUT = 300  # seconds per subprocess; far above what each needs
ERROR_LINE = re.compile(r"^mamikit (\w+): error: (\S+): (.+)$")


# ----------------------------------------------------------------------------- helpers


def _env(fault: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MAMIKIT_FAULT"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONHASHSEED="0")
    if fault:
        env["MAMIKIT_FAULT"] = fault
    return env


class _Lab:
    """Background jobs (threads driving subprocesses) and the processes they started."""

    def __init__(self, root: Path):
        self.root = root
        self.pool = ThreadPoolExecutor(max_workers=16)
        self.jobs: dict = {}
        self.procs: list[subprocess.Popen] = []
        self.lock = threading.Lock()
        self.closing = False
        self.logs = root / "logs"
        self.logs.mkdir()

    def start(self, args: list[str], name: str, fault: str | None = None) -> subprocess.Popen:
        """Start `python -m mamikit ARGS`; stdout and stderr go to files under logs/."""
        if self.closing:
            raise RuntimeError("the lab is closing")
        out = open(self.logs / f"{name}.out", "w")
        err = open(self.logs / f"{name}.err", "w")
        proc = subprocess.Popen([sys.executable, "-m", "mamikit", *map(str, args)], stdout=out, stderr=err,
                                env=_env(fault), cwd=self.root, start_new_session=True)
        proc.name = name
        out.close()
        err.close()
        with self.lock:
            self.procs.append(proc)
        return proc

    def finish(self, proc: subprocess.Popen) -> dict:
        """Wait for a process -> {"rc", "out", "err"}."""
        try:
            proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return {"rc": proc.returncode, "out": (self.logs / f"{proc.name}.out").read_text(),
                "err": (self.logs / f"{proc.name}.err").read_text()}

    def cli(self, args: list[str], name: str, fault: str | None = None) -> dict:
        return self.finish(self.start(args, name, fault))

    def submit(self, name: str, fn, *args):
        self.jobs[name] = self.pool.submit(fn, *args)

    def result(self, name: str):
        return self.jobs[name].result(timeout=6 * TIMEOUT)

    def close(self):
        self.closing = True
        with self.lock:
            for proc in self.procs:
                if proc.poll() is None:
                    proc.kill()
        self.pool.shutdown(wait=True, cancel_futures=True)


def _wait_for(predicate, what: str, timeout: float = TIMEOUT) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _inode(path: Path):
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _random_kill(proc: subprocess.Popen, marker: Path, rng: random.Random, longest: float) -> str:
    """SIGKILL `proc` at a random moment after it replaced `marker` (so after its imports, inside the work)."""
    before = _inode(marker)
    _wait_for(lambda: _inode(marker) != before or proc.poll() is not None, f"{marker} to be rewritten")
    delay = rng.uniform(0.0, longest)
    deadline = time.monotonic() + delay
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        return f"killed {delay:.2f} s into the work"
    return f"finished before the kill ({delay:.2f} s)"


def _png_header_bomb(path: Path, width: int, height: int) -> None:
    """A valid PNG whose header claims width x height 8-bit gray pixels (a few rows of data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * (width + 1) * 4)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def _files(root: Path, skip=()) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).as_posix() not in skip}


def _without_timings(obj):
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def _assert_same_store(got: Path, want: Path) -> None:
    skip = ("manifest.json", ".lock", ".lock.owner")
    a, b = _files(got, skip), _files(want, skip)
    assert sorted(a) == sorted(b), "the stores hold different files"
    for name in a:
        assert a[name] == b[name], f"{name} differs from the uninterrupted store"
    manifest = lambda root: _without_timings(json.loads((root / "manifest.json").read_text()))  # noqa: E731
    assert manifest(got) == manifest(want)


def _assert_same_run(got: Path, want: Path) -> None:
    # TensorBoard's event files carry wall times and host names (test_curves compares their scalars)
    a, b = ({k: v for k, v in _files(root, ["config.json"]).items() if not k.startswith("tensorboard/")}
            for root in (got, want))
    assert sorted(a) == sorted(b), "the runs hold different files"
    # config.json alike but for its provenance (which process trained the run, and when)
    config = lambda root: {k: v for k, v in json.loads((root / "config.json").read_text()).items()  # noqa: E731
                           if k != "provenance"}
    assert config(got) == config(want)
    for name in a:
        assert a[name] == b[name], f"{name} differs from the uninterrupted run"


def _messages(err: str) -> list[str]:
    """stderr lines other than the data reader's report of the hostile rows
    (`warning: MAMI <file> <reason>`, as `check`)."""
    return [line for line in err.splitlines()
            if line.strip() and not re.match(r"(mamikit \w+: )?warning: MAMI ", line)]


def _one_error_line(result: dict, command: str) -> re.Match:
    """The process failed with exit code 2 and exactly one line `mamikit CMD: error: FILE: REASON`."""
    assert result["rc"] == 2, result["err"]
    assert "Traceback" not in result["err"]
    lines = _messages(result["err"])
    assert len(lines) == 1, result["err"]
    match = ERROR_LINE.match(lines[0])
    assert match and match.group(1) == command, lines[0]
    return match


# ----------------------------------------------------------------------------- the lab


def _make_data(root: Path) -> Path:
    """48 synthetic MAMI memes plus hostile rows: two decompression bombs, and file names escaping the folder."""
    from mamikit.synthetic import generate

    data = root / "data"
    generate(data, seed=3, n_mami=48, n_mami_test=16, n_fbhm=0, progress=False)
    folder = data / "MAMI" / "TRAINING"
    _png_header_bomb(folder / "bomb.png", 100_000, 100_000)  # PIL itself refuses this one
    _png_header_bomb(folder / "bomb2.png", 20_000, 20_000)  # over mamikit's limit, under PIL's hard one
    Image.new("RGB", (8, 8), (200, 30, 30)).save(root / "outside.jpg")  # a readable file outside the data folder
    with open(folder / "training.csv", "a", encoding="utf-8") as fh:
        for name in ("bomb.png", "bomb2.png", "../../../outside.jpg", str(root / "outside.jpg")):
            fh.write(f"{name}\t1\t0\t1\t0\t0\tsome text\n")
    return data


def _extract_chain(lab: _Lab, data: Path, rng: random.Random) -> dict:
    """One store through: a holder of the lock, a waiter, kills at fixed points and at random, the finishing run."""
    store = lab.root / "chain" / "store"  # a folder of its own: beside lab.root / "store" it would reuse its files
    args = ["extract", "--data", data, "--out", store, *EXTRACT_ARGS]
    steps = {}
    holder = lab.start(args, "x1-holder", fault="after_chunk:2:hang")
    _wait_for(lambda: "hang at after_chunk 2" in (lab.logs / "x1-holder.err").read_text() or holder.poll() is not None,
              "the first extract to stop holding the lock")
    waiter = lab.start(args, "x2-waiter", fault="after_merge:2")
    _wait_for(lambda: "waiting for" in (lab.logs / "x2-waiter.err").read_text() or waiter.poll() is not None,
              "the second extract to say it waits")
    time.sleep(0.3)
    steps["holder_alive_while_waiter_waits"] = holder.poll() is None and waiter.poll() is None
    os.kill(holder.pid, signal.SIGKILL)  # dies holding the lock, after two chunks
    steps["holder"] = dict(lab.finish(holder), pid=holder.pid)
    steps["waiter"] = lab.finish(waiter)
    steps["rename"] = lab.cli(args, "x3-rename", fault="before_rename:4")
    killer = lab.start(args, "x4-random")
    steps["random_kill"] = _random_kill(killer, store / "manifest.json", rng, 4.0)
    steps["random"] = lab.finish(killer)
    steps["final"] = lab.cli(args, "x5-final")
    steps["store"] = store
    return steps


def _train_chain(lab: _Lab, data: Path, store: Path, rng: random.Random) -> dict:
    """One run killed between weights and state, after logging an evaluation, at random; then resumed to the end."""
    run = lab.root / "runs" / "chain"
    args = ["train", *TRAIN_ARGS, "--data", data, "--features", store, "--out", run]
    last = run / "checkpoints" / "last"
    steps = {"mid_checkpoint": lab.cli(args, "t1-mid-checkpoint", fault="mid_checkpoint:1")}
    steps["mid_checkpoint_files"] = sorted(p.name for p in last.iterdir()) if last.exists() else []
    steps["after_log"] = lab.cli([*args, "--resume"], "t2-after-log", fault="after_log:1")
    steps["after_log_steps"] = sorted({row["step"]
                                       for row in map(json.loads, (run / "log.jsonl").read_text().splitlines())
                                       if row.get("kind") != "loss"})  # the evaluations logged
    steps["after_log_checkpoint"] = json.loads((last / "state.json").read_text())["step"]
    killer = lab.start([*args, "--resume"], "t3-random")
    steps["random_kill"] = _random_kill(killer, run / "config.json", rng, 5.0)
    steps["random"] = lab.finish(killer)
    steps["final"] = lab.cli([*args, "--resume"], "t4-final")
    steps["run"] = run
    return steps


def _corrupt_runs(lab: _Lab, data: Path, store: Path, run_a: Path) -> dict:
    """Damaged copies of the store and of run A, each fed to the command that reads it."""
    root = lab.root / "damaged"
    root.mkdir()
    out = {}

    def store_copy(name):
        dst = root / name
        shutil.copytree(store, dst, ignore=shutil.ignore_patterns(".lock*"))
        return dst

    def run_copy(name):
        dst = root / name
        shutil.copytree(run_a, dst)
        return dst

    truncated = store_copy("store-truncated")
    victim = truncated / "MAMI" / "train" / "detr.safetensors"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # a Drive sync cut short
    mismatch = store_copy("store-mismatch")
    manifest = json.loads((mismatch / "manifest.json").read_text())
    manifest["datasets"]["MAMI"]["train"]["backbones"]["clip"]["rows"] += 1
    (mismatch / "manifest.json").write_text(json.dumps(manifest))
    weights = run_copy("run-weights") / "checkpoints" / "last" / "weights.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-4096:-4000] = os.urandom(96)  # bit rot inside the tensors: same size, valid header
    weights.write_bytes(bytes(raw))
    state = run_copy("run-state") / "checkpoints" / "last" / "state.json"
    state.write_text('{"epoch": 2, "step": \x00garbage')
    other = run_copy("run-other")
    logs = root / "runs-report" / "round1" / "02-seed0"
    logs.mkdir(parents=True)
    shutil.copyfile(run_a / "config.json", logs / "config.json")
    text = (run_a / "log.jsonl").read_text()
    (logs / "log.jsonl").write_text(text + text.splitlines()[0][:40])  # a row cut by a kill

    train = ["train", *TRAIN_ARGS, "--data", data]
    cases = {
        "truncated_store": (victim, [*train, "--features", truncated, "--out", root / "new-1"]),
        "manifest_mismatch": (mismatch / "MAMI" / "train" / "clip.safetensors",
                              [*train, "--features", mismatch, "--out", root / "new-2"]),
        "corrupt_weights": (weights, [*train, "--features", store, "--out", weights.parents[2], "--resume"]),
        "state_garbage": (state, [*train, "--features", store, "--out", state.parents[2], "--resume"]),
        "other_experiment": (other / "config.json", ["train", *TRAIN_ARGS, "--data", data, "--features", store,
                                                    "--out", other, "--resume", "--experiment", "10"]),
        "report_truncated_log": (logs / "log.jsonl", ["report", root / "runs-report", "--out", root / "report"]),
    }
    procs = {name: (path, lab.start(args, f"e-{name}")) for name, (path, args) in cases.items()}
    for name, (path, proc) in procs.items():
        out[name] = dict(lab.finish(proc), file=path)
    out["state_original"] = (run_a / "checkpoints" / "last" / "state.json").read_text()
    return out


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """Start every subprocess scenario at once; tests wait for the ones they check."""
    root = tmp_path_factory.mktemp("reliability")
    lab = _Lab(root)
    rng = random.Random(20220714)
    data = _make_data(root)
    clean = root / "clean"
    from mamikit.synthetic import generate

    generate(clean, seed=5, n_mami=8, n_mami_test=4, n_fbhm=0, progress=False)
    def store():
        result = lab.cli(["extract", "--data", data, "--out", root / "store", *EXTRACT_ARGS], "store")
        return dict(result, store=root / "store")

    def train(name):
        store_path = lab.result("store")["store"]
        out = root / "runs" / name
        return dict(lab.cli(["train", *TRAIN_ARGS, "--data", data, "--features", store_path, "--out", out], name),
                    run=out)

    lab.submit("store", store)
    lab.submit("extract_chain", _extract_chain, lab, data, random.Random(rng.random()))
    def check():
        hostile = lab.cli(["check", "--data", data], "check")
        good = lab.cli(["check", "--data", clean], "check-clean")
        marker = clean / ".mamikit-synthetic.json"
        marker.write_text('{"generator": "mamikit.synthetic", "complete": false}')  # as `synth` leaves it when killed
        unfinished = dict(lab.cli(["check", "--data", clean], "check-unfinished"), file=marker)
        return hostile, good, unfinished

    lab.submit("check", check)
    lab.submit("run_a", train, "a")
    lab.submit("run_b", train, "b")
    lab.submit("train_chain",
               lambda: _train_chain(lab, data, lab.result("store")["store"], random.Random(rng.random())))
    lab.submit("damaged", lambda: _corrupt_runs(lab, data, lab.result("store")["store"], lab.result("run_a")["run"]))
    yield lab
    lab.close()


# ----------------------------------------------------------------------------- input hardening and `check`


def test_check_reports_each_bad_row_once_and_exits_1(lab):
    hostile, clean, _ = lab.result("check")
    assert hostile["rc"] == 1 and "Traceback" not in hostile["err"]
    lines = hostile["out"].splitlines()
    problems = [line for line in lines if line.startswith("MAMI ") and not line.startswith("MAMI:")]
    by_file = {line.split(" ")[1]: line for line in problems}
    assert "decompression bomb" in by_file["bomb.png"]
    assert "exceeds the limit" in by_file["bomb2.png"]
    assert "escapes the data folder" in by_file["../../../outside.jpg"]
    assert "absolute" in next(line for line in problems if "outside.jpg" in line and "../" not in line)
    assert len(problems) == 4  # nothing else in the set is wrong
    assert any(line.startswith("MAMI: ") and "4 problems" in line for line in lines)
    assert lines[-1] == "4 problems"
    assert clean["rc"] == 0 and clean["out"].splitlines()[-1] == "clean"


def test_data_of_an_interrupted_synth_is_refused(lab):
    result = lab.result("check")[2]
    match = _one_error_line(result, "check")
    assert Path(match.group(2)) == result["file"] and "re-run `python -m mamikit synth" in match.group(3)


def test_extract_refuses_bombs_and_escaping_names_and_continues(lab):
    result = lab.result("store")
    assert result["rc"] == 0, result["err"]
    assert "Traceback" not in result["err"]
    manifest = json.loads((result["store"] / "manifest.json").read_text())
    skipped = [s for split in manifest["datasets"]["MAMI"].values() for s in split["skipped"]]
    assert sorted(s["id"] for s in skipped) == ["bomb.png", "bomb2.png"]
    assert all("limit" in s["reason"] or "bomb" in s["reason"] for s in skipped)
    for name in ("bomb.png", "bomb2.png"):
        assert re.search(rf"skipped MAMI/\w+ {re.escape(name)} ", result["err"])
    ids = "".join((result["store"] / "MAMI" / split / "clip.ids.txt").read_text()
                  for split in ("train", "dev", "test"))
    assert "outside" not in ids and "bomb" not in ids
    assert "could not be used" in result["err"]  # the rejected file names, pointing at `check`


def test_no_unpickling_or_evaluation_in_the_package():
    package = Path(__file__).resolve().parents[1] / "mamikit"
    pattern = re.compile(r"torch\.load\(|\bpickle\b|(?<![.\w])eval\(|(?<![.\w])exec\(|"
                         r"allow_pickle=True|yaml\.load\(|read_pickle")
    hits = [f"{p.name}:{i}" for p in package.glob("*.py") for i, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line.split("#")[0])]
    assert hits == []


# ----------------------------------------------------------------------------- extract: kills and the lock


def test_extract_killed_anywhere_resumes_to_the_same_store(lab):
    steps = lab.result("extract_chain")
    baseline = lab.result("store")["store"]
    holder, waiter = steps["holder"], steps["waiter"]
    # two extracts on one store: the second says why it waits, and goes on once the first dies holding the lock
    assert steps["holder_alive_while_waiter_waits"]
    assert holder["rc"] == -signal.SIGKILL
    assert f"another extract (pid {holder['pid']}) is writing this store" in waiter["err"]
    # killed after merging a file but before recording it in the manifest
    assert waiter["rc"] == -signal.SIGKILL and "kill at after_merge 2" in waiter["err"]
    # killed inside an atomic write, after the data and before the rename
    assert steps["rename"]["rc"] == -signal.SIGKILL and "kill at before_rename 4" in steps["rename"]["err"]
    print("random kill of extract:", steps["random_kill"])
    final = steps["final"]
    assert final["rc"] == 0, final["err"]
    assert "Traceback" not in final["err"]
    store = steps["store"]
    assert not list(store.rglob("*.tmp")) and not list(store.rglob(".parts"))
    _assert_same_store(store, baseline)


# ----------------------------------------------------------------------------- train: kills and determinism


def test_two_cli_train_runs_with_one_seed_are_byte_identical(lab):
    a, b = lab.result("run_a"), lab.result("run_b")
    assert a["rc"] == 0 and b["rc"] == 0, a["err"] + b["err"]
    files = _files(a["run"])
    assert "log.jsonl" in files and "predictions/last/test__Task_A.csv" in files
    assert "answer/best/taskB/answer.txt" in files and "predictions/best-Task_B/test__Task_B.csv" in files
    # --keep-weights best+last: the best weights of the other tasks were never written
    assert sorted(f for f in files if f.endswith(".safetensors") and f.startswith("checkpoints/")) == \
        ["checkpoints/best-Task_A/weights.safetensors", "checkpoints/last/weights.safetensors"]
    _assert_same_run(b["run"], a["run"])


def test_train_killed_anywhere_resumes_to_the_same_run(lab):
    steps = lab.result("train_chain")
    baseline = lab.result("run_a")["run"]
    # killed between the weights and state.json of the first checkpoint: the weights carry their own state
    assert steps["mid_checkpoint"]["rc"] == -signal.SIGKILL
    assert steps["mid_checkpoint_files"] == ["weights.safetensors"]
    # killed with the second evaluation logged but not checkpointed: the resume drops those rows and redoes them
    assert steps["after_log"]["rc"] == -signal.SIGKILL
    assert steps["after_log_checkpoint"] == steps["after_log_steps"][0] < steps["after_log_steps"][-1]
    print("random kill of train:", steps["random_kill"])
    final = steps["final"]
    assert final["rc"] == 0, final["err"]
    run = steps["run"]
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("kind") != "loss"]  # the evaluation rows
    keys = [(r["step"], r["split"], r["task"], r["label"], r["metric"]) for r in rows]
    assert len(keys) == len(set(keys)), "an evaluation was logged twice"
    assert len({r["step"] for r in rows}) == 2 * 2  # epochs x evals_per_epoch: none missing
    _assert_same_run(run, baseline)


# ----------------------------------------------------------------------------- damaged files: one line, no traceback


@pytest.mark.parametrize("case, reason", [
    ("truncated_store", r"truncated"),
    ("manifest_mismatch", r"the manifest says"),
    ("corrupt_weights", r"checkpoint is corrupt"),
    ("other_experiment", r"started with other experiment settings \(.*name"),
])
def test_damaged_input_gives_one_line_naming_the_file(lab, case, reason):
    result = lab.result("damaged")[case]
    match = _one_error_line(result, "train")
    assert Path(match.group(2)).resolve() == Path(result["file"]).resolve()
    assert re.search(reason, match.group(3)), match.group(3)


def test_garbage_state_json_is_restored_from_the_weights(lab):
    damaged = lab.result("damaged")
    result = damaged["state_garbage"]
    assert result["rc"] == 0 and "Traceback" not in result["err"]
    lines = [line for line in _messages(result["err"]) if ": warning: " in line]
    assert len(lines) == 1 and lines[0].startswith(f"mamikit train: warning: {result['file']}: not valid JSON")
    assert "already complete" in result["err"]  # progress notes go to stderr, through the mamikit logger
    assert Path(result["file"]).read_text() == damaged["state_original"]


def test_report_on_a_log_cut_by_a_kill_warns_in_one_line(lab):
    result = lab.result("damaged")["report_truncated_log"]
    assert result["rc"] == 0 and "Traceback" not in result["err"]
    lines = [line for line in result["err"].splitlines() if ": warning: " in line]
    assert len(lines) == 1 and re.match(rf"mamikit report: warning: .*{re.escape(str(result['file']))} "
                                        r"line \d+: truncated last line", lines[0])
    assert "report:" in result["out"]


def test_truncated_checkpoint_and_old_state_are_named(tmp_path):
    from mamikit.checkpoints import _checkpoint_state, _read_checkpoint
    from mamikit.utils import MamikitError

    path = tmp_path / "weights.safetensors"
    path.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(MamikitError, match=re.escape(str(path))):
        _read_checkpoint(path)
    (tmp_path / "state.json").write_text("not json")
    with pytest.raises(MamikitError, match=r"state\.json: not valid JSON"):
        _checkpoint_state(tmp_path, None)  # a checkpoint without an embedded state has only state.json
