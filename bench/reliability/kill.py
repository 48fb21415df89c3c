"""Kill campaign: `cvm update` (training, checkpoint, export, publish) killed with SIGKILL at named
points and at seeded random times, with a real server answering all along.

Named points use the fault hook in ``stop`` mode (``CVM_FAULT_AT=<point>:stop``): the update stops
itself exactly there and the harness sends ``kill -9``. Random kills follow the update's own log
lines ("training on ...", "exporting the bundle ...") and wait a seeded random fraction of the
phase's measured length, or a random time since the start. After every kill the harness checks
that LATEST and CURRENT name complete, loadable versions, that `cvm status` works, that the server
answered every request with the old or the new bundle, and that the temp entries the kill left
are gone once the next update has started.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.reliability.common import (
    FAST_UPDATE,
    LoopClient,
    Server,
    current_bundle_name,
    cvm_argv,
    tmp_entries,
)

# phase -> the log line that starts it
MARKERS = {
    "training": "training on ",
    "saving": "saving the checkpoint",
    "export": "exporting the bundle of",
    "publish": "published bundle",
}


@dataclasses.dataclass(frozen=True)
class KillSpec:
    """Where to kill: a fault point (``point``), or ``delay_frac`` of a phase after its log line
    (``after``), or ``delay_frac`` of the whole update after the start (``after`` = "start")."""

    label: str
    phase: str
    point: str | None = None
    after: str | None = None
    delay_frac: float = 0.0


# Fault points in the order an update reaches them (see RELIABILITY.md).
HOOK_POINTS = (
    ("training", "update_training"),
    ("checkpoint write", "update_saving"),
    ("checkpoint write", "checkpoint_files_written"),
    ("checkpoint write", "checkpoints_before_rename"),
    ("checkpoint write", "before_pointer"),
    ("bundle export", "update_exporting"),
    ("publish", "bundle_files_written"),
    ("publish", "bundles_before_rename"),
    ("publish", "before_bundle_pointer"),
)


def default_plan(seed: int, n_random: int = 3) -> list[KillSpec]:
    """Every fault point, plus ``n_random`` seeded random-time kills (mid-training, mid-export,
    anywhere) interleaved."""
    rng = random.Random(seed)
    plan = [KillSpec(f"hook:{p}", phase, point=p) for phase, p in HOOK_POINTS]
    randoms = []
    for i in range(n_random):
        kind = ("training", "bundle export", "anywhere")[i % 3]
        after = {"training": "training", "bundle export": "export", "anywhere": "start"}[kind]
        randoms.append(KillSpec(f"random:{kind}", kind, after=after, delay_frac=rng.uniform(0.15, 0.85)))
    # a random kill after each third hook kill, so different states feed the next update
    out: list[KillSpec] = []
    for i, spec in enumerate(plan):
        out.append(spec)
        if i % 3 == 0 and randoms:
            out.append(randoms.pop(0))
    return out + randoms


@dataclasses.dataclass
class Timeline:
    """Seconds from the start of an uninterrupted update to each phase's log line, and the end."""

    marks: dict[str, float]
    total: float

    def phase_length(self, phase: str) -> float:
        order = ["start", "training", "saving", "export", "publish"]
        t = {"start": 0.0, **self.marks}
        i = order.index(phase)
        nxt = next((t[o] for o in order[i + 1 :] if o in t), self.total)
        return max(0.1, nxt - t[phase])


class UpdateProcess:
    """`cvm update` with its stderr read line by line (with arrival times) from a thread."""

    def __init__(self, workdir: Path, data: Path, env: dict[str, str]) -> None:
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            cvm_argv("update", "--workdir", str(workdir), "--data", str(data), *FAST_UPDATE),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
        )
        self.lines: queue.Queue[tuple[float, str]] = queue.Queue()
        self.seen: list[tuple[float, str]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put((time.monotonic() - self.t0, line.rstrip()))

    def wait_for(self, text: str, timeout: float) -> float | None:
        """Seconds since start when a stderr line containing ``text`` arrived (None: the process
        ended or the time ran out first)."""
        for t, line in self.seen:
            if text in line:
                return t
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                t, line = self.lines.get(timeout=0.05)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    return None
                continue
            self.seen.append((t, line))
            if text in line:
                return t
        return None

    def drain(self) -> None:
        while True:
            try:
                self.seen.append(self.lines.get_nowait())
            except queue.Empty:
                return

    def phase_now(self) -> str:
        self.drain()
        phase = "start"
        for _, line in self.seen:
            for name, marker in MARKERS.items():
                if marker in line:
                    phase = name
        return phase

    def kill(self) -> bool:
        """SIGKILL; False when the process had already ended."""
        if self.proc.poll() is not None:
            return False
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        return True


def measure_timeline(workdir: Path, data: Path, timeout: float = 600) -> Timeline:
    """One uninterrupted update (it must succeed): when each phase starts."""
    up = UpdateProcess(workdir, data, {})
    marks: dict[str, float] = {}
    for phase, marker in MARKERS.items():
        t = up.wait_for(marker, timeout)
        if t is not None:
            marks[phase] = t
    code = up.proc.wait(timeout=timeout)
    if code != 0:
        raise RuntimeError(f"calibration update failed ({code}): {[line for _, line in up.seen][-5:]}")
    return Timeline(marks, time.monotonic() - up.t0)


def store_invariants(workdir: Path, run_status: Callable[[Path], int]) -> dict[str, Any]:
    """LATEST and CURRENT name complete versions that load and verify; `cvm status` answers."""
    from cvm_edge.checkpoints import CheckpointStore
    from deploy.bundle import current_bundle_dir
    from deploy.predictor import Predictor, PredictorOptions

    store = CheckpointStore(workdir)
    ckpt = store.load()  # raises if LATEST names anything incomplete or unreadable
    bundle_dir = current_bundle_dir(workdir)
    if bundle_dir is None:
        raise AssertionError("CURRENT names no bundle")
    predictor = Predictor(bundle_dir, PredictorOptions(intra_op_threads=1))  # sha256 verified, loads
    status = run_status(workdir)
    if status != 0:
        raise AssertionError(f"cvm status exited {status}")
    return {"latest": ckpt.version, "current": predictor.name}


@dataclasses.dataclass
class KillResult:
    label: str
    phase: str  # the phase the kill was aimed at
    landed: str  # the last phase log line seen before the kill (or the fault point)
    killed: bool
    at_s: float
    before: dict[str, Any]
    after: dict[str, Any]
    tmp_left: int
    tmp_cleaned_by_next_start: bool | None = None
    served_versions: list[str] = dataclasses.field(default_factory=list)
    failed_requests: int = 0


def kill_once(
    spec: KillSpec, workdir: Path, data: Path, timeline: Timeline, timeout: float = 300
) -> tuple[UpdateProcess, bool, str]:
    """Start an update and kill it as ``spec`` says. Returns the process, whether it was killed
    (rather than finishing first) and the phase it was in."""
    env = {"CVM_FAULT_AT": f"{spec.point}:stop"} if spec.point else {}
    up = UpdateProcess(workdir, data, env)
    if spec.point:
        t = up.wait_for(f"fault point {spec.point} reached", timeout)
        if t is None:
            up.kill()
            raise AssertionError(f"{spec.label}: the update never reached {spec.point}: {up.seen[-5:]}")
        return up, up.kill(), spec.phase
    assert spec.after is not None
    if spec.after == "start":
        time.sleep(spec.delay_frac * timeline.total)
    else:
        if up.wait_for(MARKERS[spec.after], timeout) is None:
            raise AssertionError(f"{spec.label}: no {spec.after!r} log line: {up.seen[-5:]}")
        time.sleep(spec.delay_frac * timeline.phase_length(spec.after))
    landed = up.phase_now()
    return up, up.kill(), landed


def run_campaign(
    workdir: Path,
    data: Path,
    server: Server,
    images: Sequence[bytes],
    plan: Sequence[KillSpec],
    run_status: Callable[[Path], int],
    timeline: Timeline,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run ``plan`` against ``workdir`` (a store with a published bundle that ``server`` serves;
    ``timeline`` measured by :func:`measure_timeline` on it), then one update that must succeed.
    Raises AssertionError on the first broken promise."""
    if not server.wait_serving(current_bundle_name(workdir) or "", 15):
        raise AssertionError("the server does not serve CURRENT")
    results: list[KillResult] = []
    with LoopClient(server.url, images) as client:
        for spec in plan:
            before = store_invariants(workdir, run_status)
            left_before = tmp_entries(workdir)
            t_start = time.monotonic()
            up, killed, landed = kill_once(spec, workdir, data, timeline)
            at = time.monotonic() - up.t0
            if results and left_before:  # did this update's start remove what the last kill left?
                started = any(MARKERS["training"] in line for _, line in up.seen)
                results[-1].tmp_cleaned_by_next_start = not (left_before & tmp_entries(workdir)) if started else None
            after = store_invariants(workdir, run_status)
            if not server.wait_serving(after["current"], 15):
                raise AssertionError(f"{spec.label}: server does not serve CURRENT {after['current']}")
            answers = client.since(t_start)
            served = sorted({a.version for a in answers if a.version})
            failed = sum(1 for a in answers if a.status != 200)
            allowed = {before["current"], after["current"]}
            if failed or not set(served) <= allowed:
                raise AssertionError(f"{spec.label}: server answered {served} / {failed} failures, allowed {allowed}")
            result = KillResult(
                spec.label, spec.phase, landed, killed, round(at, 3), before, after, len(tmp_entries(workdir))
            )
            result.served_versions, result.failed_requests = served, failed
            results.append(result)
            log(
                f"{spec.label}: killed={killed} in {landed} at {at:.2f} s; LATEST v{after['latest']}, "
                f"CURRENT {after['current']}, {result.tmp_left} temp entries left"
            )
        left = tmp_entries(workdir)
        final = subprocess.run(
            cvm_argv("-q", "update", "--workdir", str(workdir), "--data", str(data), *FAST_UPDATE),
            capture_output=True,
            text=True,
            timeout=600,
        )
        if final.returncode != 0:
            raise AssertionError(f"the update after the campaign failed: {final.stderr[-2000:]}")
        if results and left:
            results[-1].tmp_cleaned_by_next_start = not (left & tmp_entries(workdir))
        end = store_invariants(workdir, run_status)
        if not server.wait_serving(end["current"], 15):
            raise AssertionError("server does not serve the final update's bundle")
        total_answers = len(client.answers)
        total_failed = sum(1 for a in client.answers if a.status != 200) + len(
            [e for e in client.errors if not e[:3].isdigit()]
        )
    return {
        "kills": [dataclasses.asdict(r) for r in results],
        "n_kills": sum(r.killed for r in results),
        "phases_hit": sorted({r.phase for r in results if r.killed}),
        "points_hit": [r.label for r in results if r.killed],
        "calibration_timeline_s": {
            **{k: round(v, 3) for k, v in timeline.marks.items()},
            "end": round(timeline.total, 3),
        },
        "final_update": {"exit_code": final.returncode, **end},
        "temp_entries_after_final_update": len(tmp_entries(workdir)),
        "server_requests": total_answers,
        "server_failed_requests": total_failed,
    }
