"""The Flower app: a ServerApp that runs fleet rounds on the coordinator's store and a ClientApp
that runs each step on a device's store (``fleet.device``), through Flower's Message API.

A round, each step one message to every device:
1. ``query.sync``: the fleet's base and table; a device settles its last upload, creates its store
   on the base if it has none, and names the classes of its data that the table lacks (appended).
2. ``train.upload``: the device runs ``cvm update`` on its local data (once) and uploads the
   statistics it added since the coordinator last took them. The coordinator checks and sums them.
3. ``evaluate.score``: the fleet's statistics (float64); each device tallies its held-out images for
   every candidate lambda, so lambda is chosen on the union of the fleet's held-out images.
4. ``query.publish``: the coordinator has published its version; each device publishes the same
   solution in its store and exports its bundle (the old bundle serves until parity passes)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from cvm_edge.analytic import RidgeStats
from cvm_edge.concepts import ConceptTable
from fleet.coordinator import Coordinator
from fleet.device import StoreDevice, Upload
from fleet.merge import QuorumError, Votes, choose_lambda, class_accuracy, merge_round, summed
from fleet.report import RoundReport, load_rounds, print_matrix, save_rounds
from fleet.settings import FleetSettings
from fleet.wire import Contribution, ContributionError, pack_stats, packed_bytes, stats_digest, unpack_stats

log = logging.getLogger(__name__)


class Device(Protocol):
    """One device's side of the round's steps (``fleet.device.StoreDevice``; the benchmark's
    feature-level devices implement it too)."""

    def sync(self, base: dict[str, Any], table: ConceptTable, merged_id: str | None) -> list[str]: ...
    def learn(self, table: ConceptTable) -> dict[str, Any] | None: ...
    def upload(self, wire_dtype: str, table: ConceptTable) -> Upload: ...
    def score(self, fleet: RidgeStats, table: ConceptTable, grid: tuple[float, ...]) -> Votes: ...
    def publish(
        self, digest: str, relative_lambda: float, merged: bool, table: ConceptTable, entry: dict[str, Any]
    ) -> dict[str, Any]: ...


# ----- record helpers ----------------------------------------------------------------------------
def _blob(data: bytes) -> Array:
    return Array(np.frombuffer(data, np.uint8).copy())


def _table_of(content: RecordDict) -> ConceptTable:
    return ConceptTable.from_bytes(content.array_records["table"]["bytes"].numpy().tobytes(), "the fleet's table")


def _stats_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def _arrays(content: RecordDict, record: str) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in content.array_records[record].items()}


def _config(content: RecordDict) -> dict[str, Any]:
    return dict(json.loads(str(content.config_records["config"]["json"])))


def _content(config: Mapping[str, Any], **arrays: ArrayRecord) -> RecordDict:
    return RecordDict({"config": ConfigRecord({"json": json.dumps(config)}), **arrays})


# ----- what the coordinator accepts from a device --------------------------------------------------
# A device's answer is untrusted: a broken or hostile one is named and left out, it never ends the
# round for the others (a KeyError in one reply used to end the ServerApp).
MAX_NAME_CHARS = 200
MAX_WANTED = 256  # class names one device may ask for in a round (the table is append-only)


def _sync_answer(r: Message) -> tuple[str, list[str]]:
    """The device's name and the class names it asks for; ContributionError when malformed."""
    try:
        cfg = _config(r.content)
        name, wanted = cfg["name"], cfg["wanted"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ContributionError(f"sync answer without a name and wanted classes ({exc!r})") from None
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
        raise ContributionError("sync answer with no valid device name")
    if not isinstance(wanted, list) or len(wanted) > MAX_WANTED:
        raise ContributionError(f"wanted classes must be a list of at most {MAX_WANTED} names")
    if not all(isinstance(w, str) and 0 < len(w.strip()) and len(w) <= MAX_NAME_CHARS for w in wanted):
        raise ContributionError(f"wanted classes must be names of 1 to {MAX_NAME_CHARS} characters")
    return name, wanted


def _upload_answer(name: str, r: Message, rows: int, dim: int) -> Contribution:
    """The device's upload, checked; ContributionError when malformed."""
    try:
        cfg = _config(r.content)
        arrays = _arrays(r.content, "stats")
        base, table, cid = cfg["base"], cfg["table"], cfg["id"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ContributionError(f"upload without statistics, base, table or id ({exc!r})") from None
    if not all(isinstance(v, str) and len(v) <= MAX_NAME_CHARS for v in (base, table, cid)):
        raise ContributionError("upload whose base, table or id is not a short string")
    stats = unpack_stats(arrays, max_rows=rows, dim=dim)
    return Contribution(name, base, table, stats, cid, packed_bytes(arrays))


def _votes_answer(r: Message, n_lambdas: int, rows: int) -> Votes:
    """The device's held-out tally, checked (integers, the round's grid and table, 0 <= correct <= total)."""
    try:
        arrays = _arrays(r.content, "votes")
        correct, total = np.asarray(arrays["correct"]), np.asarray(arrays["total"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ContributionError(f"votes without correct and total ({exc!r})") from None
    if correct.dtype.kind not in "iu" or total.dtype.kind not in "iu":
        raise ContributionError("votes must be integer counts")
    if total.ndim != 1 or not 0 < len(total) <= rows or correct.shape != (n_lambdas, len(total)):
        raise ContributionError(f"votes of shapes {correct.shape} and {total.shape} for {n_lambdas} lambdas")
    if (total < 0).any() or (correct < 0).any() or (correct > total).any():
        raise ContributionError("votes with negative counts or more correct than held-out images")
    return Votes(correct.astype(np.int64), total.astype(np.int64))


# ----- client ------------------------------------------------------------------------------------
def make_client_app(make_device: Callable[[Context], tuple[str, Device]]) -> ClientApp:
    """A ClientApp whose steps run on ``make_device(context)`` -> (device name, device)."""
    app = ClientApp()

    @app.query("sync")
    def sync(msg: Message, context: Context) -> Message:
        name, device = make_device(context)
        cfg = _config(msg.content)
        wanted = device.sync(cfg["base"], _table_of(msg.content), cfg["merged"].get(name))
        return Message(_content({"name": name, "wanted": wanted}), reply_to=msg)

    @app.train("upload")
    def upload(msg: Message, context: Context) -> Message:
        name, device = make_device(context)
        cfg = _config(msg.content)
        table = _table_of(msg.content)
        learned = device.learn(table)
        up = device.upload(cfg["wire_dtype"], table)
        reply = {
            "name": name,
            "base": up.base,
            "table": up.table,
            "id": up.contribution_id,
            "images": up.images,
            "learned": None if learned is None else {k: learned.get(k) for k in ("task", "n_train", "all_accuracy")},
        }
        return Message(_content(reply, stats=_stats_record(up.arrays)), reply_to=msg)

    @app.evaluate("score")
    def score(msg: Message, context: Context) -> Message:
        name, device = make_device(context)
        cfg = _config(msg.content)
        fleet = unpack_stats(_arrays(msg.content, "stats"))
        votes = device.score(fleet, _table_of(msg.content), tuple(cfg["lambdas"]))
        return Message(
            _content({"name": name}, votes=_stats_record({"correct": votes.correct, "total": votes.total})),
            reply_to=msg,
        )

    @app.query("publish")
    def publish(msg: Message, context: Context) -> Message:
        name, device = make_device(context)
        cfg = _config(msg.content)
        out = device.publish(
            cfg["digest"], float(cfg["lambda"]), name in cfg["merged"], _table_of(msg.content), cfg["entry"]
        )
        return Message(_content({"name": name, **out}), reply_to=msg)

    return app


def _store_device(context: Context) -> tuple[str, Device]:
    cfg = context.node_config
    workdir = str(cfg.get("workdir", ""))
    if not workdir:
        raise ValueError("this SuperNode has no workdir: start it with --node-config \"workdir='DIR'\"")
    data = str(cfg.get("data", "")) or None
    device = StoreDevice(Path(workdir), Path(data) if data else None, float(cfg.get("max-forgetting", 10.0)))
    return str(cfg.get("name", "") or workdir), device


# ----- server ------------------------------------------------------------------------------------
def _message(content: RecordDict, kind: str, node: int) -> Message:
    return Message(content=content, dst_node_id=node, message_type=kind)


class _Round:
    """Sends one step to a set of nodes and sorts the answers into replies and failures."""

    def __init__(
        self, grid: Grid, timeout_s: float, new_message: Callable[[RecordDict, str, int], Message] | None = None
    ) -> None:
        self.grid, self.timeout_s = grid, timeout_s
        self.new_message = new_message or _message
        self.seconds: dict[str, float] = {}  # wall time of each step (slowest device)

    def ask(self, kind: str, contents: Mapping[int, RecordDict]) -> tuple[dict[int, Message], dict[int, str]]:
        t0 = time.perf_counter()
        try:
            return self._ask(kind, contents)
        finally:
            self.seconds[kind] = round(time.perf_counter() - t0, 3)

    def _ask(self, kind: str, contents: Mapping[int, RecordDict]) -> tuple[dict[int, Message], dict[int, str]]:
        msgs = [self.new_message(c, kind, n) for n, c in contents.items()]
        replies: dict[int, Message] = {}
        failed: dict[int, str] = {}
        for r in self.grid.send_and_receive(msgs, timeout=self.timeout_s):
            node = r.metadata.src_node_id
            if r.has_error():
                failed[node] = f"{kind} failed: {r.error.reason}"[:500]
            else:
                replies[node] = r
        for n in contents:
            if n not in replies and n not in failed:
                failed[n] = f"no answer to {kind} within {self.timeout_s:g} s (dropped out)"
        return replies, failed


def _wait_for_nodes(grid: Grid, n: int, wait_s: float) -> list[int]:
    deadline = time.monotonic() + wait_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n or time.monotonic() > deadline:
            return nodes
        time.sleep(0.5)


def run_rounds(grid: Grid, settings: FleetSettings) -> list[RoundReport]:
    coord = Coordinator(settings.workdir)
    earlier = load_rounds(settings.workdir)
    reports: list[RoundReport] = []
    for _ in range(settings.rounds):
        rnd = coord.rounds_done() + 1  # rounds are numbered by published rounds over the coordinator's life
        t0 = time.perf_counter()
        nodes = _wait_for_nodes(grid, settings.min_devices, settings.wait_s)
        if len(nodes) < settings.min_devices:
            log.error("round %d: %d of %d devices connected; nothing published", rnd, len(nodes), settings.min_devices)
            reports.append(RoundReport.refused(rnd, f"{len(nodes)} of {settings.min_devices} devices connected"))
            save_rounds(settings.workdir, earlier, reports)
            continue
        report = _one_round(grid, coord, settings, rnd, nodes, t0)
        reports.append(report)
        save_rounds(settings.workdir, earlier, reports)
        print_matrix(reports)
    return reports


def _one_round(
    grid: Grid, coord: Coordinator, settings: FleetSettings, rnd: int, nodes: list[int], t0: float
) -> RoundReport:
    step = _Round(grid, settings.timeout_s)
    base, _ = coord.base()
    table = coord.table()
    merged_ids = coord.merged_ids()

    def with_table(cfg: Mapping[str, Any], **arrays: ArrayRecord) -> RecordDict:
        return _content(cfg, table=ArrayRecord({"bytes": _blob(table.to_bytes())}), **arrays)

    replies, failed_nodes = step.ask("query.sync", {n: with_table({"base": base, "merged": merged_ids}) for n in nodes})
    failed = {f"node {n}": why for n, why in failed_nodes.items()}
    answers: dict[int, tuple[str, list[str]]] = {}
    for n, r in replies.items():
        try:
            answers[n] = _sync_answer(r)
        except ContributionError as exc:
            failed[f"node {n}"] = str(exc)
    # The coordinator records merged uploads by device name: two nodes under one name would settle
    # each other's uploads (one counted twice), so both are left out until one is renamed.
    by_name: dict[str, list[int]] = {}
    for n, (name, _) in answers.items():
        by_name.setdefault(name, []).append(n)
    for name, ns in by_name.items():
        if len(ns) > 1:
            for n in ns:
                del answers[n]
            failed[name] = (
                f"{len(ns)} devices (nodes {', '.join(map(str, ns))}) use this name; give each its own --name"
            )
    names = {n: name for n, (name, _) in answers.items()}
    wanted = [w for _, ws in answers.values() for w in ws]
    if wanted:
        table = coord.extend(wanted)
    asked = [names.get(n, f"node {n}") for n in nodes]

    replies, failed_nodes = step.ask(
        "train.upload", {n: with_table({"wire_dtype": settings.wire_dtype}) for n in names}
    )
    failed.update({names[n]: why for n, why in failed_nodes.items()})
    contributions: list[Contribution] = []
    up_bytes: dict[str, int] = {}
    expected = coord.expected(table)
    for n, r in replies.items():
        try:
            c = _upload_answer(names[n], r, expected.rows, expected.dim)
        except ContributionError as exc:
            failed[names[n]] = f"statistics refused: {exc}"
            continue
        up_bytes[names[n]] = c.wire_bytes
        contributions.append(c)
    try:
        merge = merge_round(coord.stats(), contributions, expected, asked, settings.quorum, failed)
    except QuorumError as exc:
        log.error("round %d: %s; nothing published", rnd, exc)
        return RoundReport.refused(rnd, str(exc), refused=exc.refused)
    for name, why in merge.refused.items():
        log.warning("round %d: device %s left out: %s", rnd, name, why)
    accepted_nodes = {n: names[n] for n in names if names[n] in merge.accepted}

    global_arrays = pack_stats(merge.stats, "float64")
    stats_rec = _stats_record(global_arrays)
    replies, failed_nodes = step.ask(
        "evaluate.score", {n: with_table({"lambdas": list(settings.lambdas)}, stats=stats_rec) for n in accepted_nodes}
    )
    not_scored = {names[n]: why for n, why in failed_nodes.items()}
    votes: dict[str, Votes] = {}
    for n, r in replies.items():
        try:
            votes[names[n]] = _votes_answer(r, len(settings.lambdas), len(table.names))
        except ContributionError as exc:
            not_scored[names[n]] = f"votes refused: {exc}"
    for name, why in not_scored.items():  # merged and published, but lambda is chosen without their held-out images
        log.warning("round %d: device %s did not score: %s", rnd, name, why)
    lam, scores = choose_lambda(settings.lambdas, list(votes.values()))
    device_acc = {d: _mean(class_accuracy(settings.lambdas, lam, v)) for d, v in votes.items()}
    fleet_acc = scores.get(f"{lam:g}")
    digest = stats_digest(merge.stats)
    fleet_classes = class_accuracy(settings.lambdas, lam, summed(list(votes.values()))) if votes else {}
    entry = {
        "fleet_round": rnd,
        "per_class_accuracy": {str(c): round(a, 6) for c, a in fleet_classes.items()},
        "devices": list(merge.accepted),
        "left_out": dict(merge.refused),
        "lambda_scores": scores,
        "all_accuracy": fleet_acc,
        "device_accuracy": device_acc,
    }
    version = coord.publish(merge, table, lam, entry)
    replies, publish_failed = step.ask(
        "query.publish",
        {
            n: with_table({"digest": digest, "lambda": lam, "merged": list(merge.merged_ids), "entry": entry})
            for n in accepted_nodes
        },
    )
    published = {names[n]: _config(r.content) for n, r in replies.items()}
    for n, why in publish_failed.items():
        log.warning("round %d: device %s did not publish: %s", rnd, names[n], why)
    down = packed_bytes(global_arrays) + len(table.to_bytes())
    return RoundReport(
        round=rnd,
        version=version,
        published=True,
        relative_lambda=lam,
        fleet_accuracy=fleet_acc,
        device_accuracy=device_acc,
        left_out=dict(merge.refused),
        not_scored=not_scored,
        upload_bytes=up_bytes,
        download_bytes=down,
        devices_published={d: p.get("version") for d, p in published.items()},
        wall_s=round(time.perf_counter() - t0, 3),
        step_s=dict(step.seconds),
        classes=int(np.count_nonzero(merge.stats.counts)),
        images=int(merge.stats.counts.sum()),
    )


def _mean(d: Mapping[int, float]) -> float | None:
    return round(float(np.mean(list(d.values()))), 6) if d else None


def make_server_app(settings: FleetSettings | None = None) -> ServerApp:
    """A ServerApp running ``settings`` (None: read them from Flower's run config)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        s = settings or FleetSettings.from_run_config(dict(context.run_config))
        run_rounds(grid, s)

    return app


server_app = make_server_app()
client_app = make_client_app(_store_device)
