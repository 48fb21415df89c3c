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
   solution in its store and exports its bundle (the old bundle serves until parity passes).

A gradient fleet's round (``merge`` fedavg or fusion, ``fleet.average``; ``fleet.weights_device``):
1. ``query.sync`` as above.
2. ``train``: the fleet's head weights go out as Flower's FedAvg sends them (``arrays``); each device
   starts from them, runs ``cvm update`` on its images and answers with its head weights
   (``arrays``) and ``num-examples``. The coordinator checks them and merges (FedAvg or fusion).
3. ``query.publish_weights``: the coordinator has published the merged weights; each device
   publishes them, exports its bundle and tallies them on its held-out images."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from cvm_edge.analytic import RidgeStats
from cvm_edge.concepts import ConceptTable
from fleet.average import (
    ExpectedWeights,
    WeightsUpload,
    head_weights,
    merge_mismatch,
    merge_weights,
    weights_digest,
)
from fleet.coordinator import Coordinator
from fleet.device import StoreDevice, Upload
from fleet.merge import QuorumError, Votes, choose_lambda, class_accuracy, merge_round, summed
from fleet.report import RoundReport, load_rounds, print_matrix, save_rounds
from fleet.settings import FleetSettings
from fleet.weights_device import LocalTraining, WeightsDevice
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


def _weights_record(weights: Mapping[str, np.ndarray]) -> ArrayRecord:
    # np.array, not ascontiguousarray: the logit scale is a 0-d array and must keep its shape
    return ArrayRecord({k: Array(np.array(v, order="C")) for k, v in weights.items()})


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


def _collect_votes(
    replies: Mapping[int, Message], names: Mapping[int, str], n_lambdas: int, rows: int, not_scored: dict[str, str]
) -> dict[str, Votes]:
    """Each replying device's checked tally (device name -> Votes); a malformed one goes to
    ``not_scored`` with why, and the round goes on without it."""
    votes: dict[str, Votes] = {}
    for n, r in replies.items():
        try:
            votes[names[n]] = _votes_answer(r, n_lambdas, rows)
        except ContributionError as exc:
            not_scored[names[n]] = f"votes refused: {exc}"
    return votes


# ----- client ------------------------------------------------------------------------------------
def make_client_app(
    make_device: Callable[[Context], tuple[str, Device]],
    make_weights_device: Callable[[Context], tuple[str, WeightsDevice]] | None = None,
) -> ClientApp:
    """A ClientApp whose steps run on ``make_device(context)`` -> (device name, device); a gradient
    fleet's (the base's learner is gradient) on ``make_weights_device(context)``."""
    app = ClientApp()

    def weights_device(context: Context) -> tuple[str, WeightsDevice]:
        if make_weights_device is None:
            raise ValueError("this ClientApp does not run gradient fleets")
        return make_weights_device(context)

    @app.query("sync")
    def sync(msg: Message, context: Context) -> Message:
        cfg = _config(msg.content)
        gradient = cfg["base"]["model"].get("learner") == "gradient"
        name, device = weights_device(context) if gradient else make_device(context)
        wanted = device.sync(cfg["base"], _table_of(msg.content), cfg["merged"].get(name))
        return Message(_content({"name": name, "wanted": wanted}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        """FedAvg's message: the fleet's weights in ``arrays``; the device's after ``cvm update`` out."""
        name, device = weights_device(context)
        cfg = _config(msg.content)
        local = LocalTraining(epochs=int(cfg["local-epochs"]), prototype=bool(cfg.get("prototype", False)))
        up = device.train(_arrays(msg.content, "arrays"), cfg["seen"], _table_of(msg.content), cfg["entry"], local)
        records = {"arrays": _weights_record(up.weights)}
        if up.prototype is not None:
            records["prototype"] = _weights_record({"prototype": up.prototype})
        reply = _content(
            {"name": name, "base": up.base, "table": up.table, "seen": list(up.seen), "local": list(up.local)},
            **records,
        )
        reply["metrics"] = MetricRecord({"num-examples": up.images})
        return Message(reply, reply_to=msg)

    @app.query("publish_weights")
    def publish_weights(msg: Message, context: Context) -> Message:
        name, device = weights_device(context)
        cfg = _config(msg.content)
        out, votes = device.publish(
            cfg["digest"], _arrays(msg.content, "arrays"), cfg["seen"], _table_of(msg.content), cfg["entry"]
        )
        return Message(
            _content({"name": name, **out}, votes=_stats_record({"correct": votes.correct, "total": votes.total})),
            reply_to=msg,
        )

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


def _node(context: Context) -> tuple[str, Path, Path | None, float]:
    """This SuperNode's device name, store, data folder and forgetting gate (its --node-config)."""
    cfg = context.node_config
    workdir = str(cfg.get("workdir", ""))
    if not workdir:
        raise ValueError("this SuperNode has no workdir: start it with --node-config \"workdir='DIR'\"")
    data = str(cfg.get("data", "")) or None
    return (
        str(cfg.get("name", "") or workdir),
        Path(workdir),
        Path(data) if data else None,
        float(cfg.get("max-forgetting", 10.0)),
    )


def _store_device(context: Context) -> tuple[str, Device]:
    name, workdir, data, max_forgetting = _node(context)
    return name, StoreDevice(workdir, data, max_forgetting)


def _weights_device(context: Context) -> tuple[str, WeightsDevice]:
    name, workdir, data, max_forgetting = _node(context)
    return name, WeightsDevice(workdir, data, max_forgetting)


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
    mismatch = merge_mismatch(settings.merge, coord.learner())
    if mismatch:  # `cvm fleet run` refuses this before Flower starts; a hand-written run config may not
        log.error("%s; nothing published", mismatch)
        save_rounds(settings.workdir, earlier, [RoundReport.refused(coord.rounds_done() + 1, mismatch)])
        return [RoundReport.refused(coord.rounds_done() + 1, mismatch)]
    for _ in range(settings.rounds):
        rnd = coord.rounds_done() + 1  # rounds are numbered by published rounds over the coordinator's life
        t0 = time.perf_counter()
        nodes = _wait_for_nodes(grid, settings.min_devices, settings.wait_s)
        if len(nodes) < settings.min_devices:
            log.error("round %d: %d of %d devices connected; nothing published", rnd, len(nodes), settings.min_devices)
            reports.append(RoundReport.refused(rnd, f"{len(nodes)} of {settings.min_devices} devices connected"))
            save_rounds(settings.workdir, earlier, reports)
            continue
        round_fn = _one_round if settings.merge == "analytic" else _weights_round
        report = round_fn(grid, coord, settings, rnd, nodes, t0)
        reports.append(report)
        save_rounds(settings.workdir, earlier, reports)
        print_matrix(reports)
    return reports


def _with_table(table: ConceptTable, cfg: Mapping[str, Any], **arrays: ArrayRecord) -> RecordDict:
    return _content(cfg, table=ArrayRecord({"bytes": _blob(table.to_bytes())}), **arrays)


def _sync_step(
    step: _Round, coord: Coordinator, nodes: list[int], merged_ids: Mapping[str, str]
) -> tuple[dict[int, str], dict[str, str], ConceptTable, list[str]]:
    """Step 1 of every round: the devices' names (node -> name), those that failed and why, the
    table extended by the classes they asked for, and every asked device's name."""
    base, _ = coord.base()
    table = coord.table()
    replies, failed_nodes = step.ask(
        "query.sync", {n: _with_table(table, {"base": base, "merged": dict(merged_ids)}) for n in nodes}
    )
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
    return names, failed, table, asked


def _one_round(
    grid: Grid, coord: Coordinator, settings: FleetSettings, rnd: int, nodes: list[int], t0: float
) -> RoundReport:
    step = _Round(grid, settings.timeout_s)
    merged_ids = coord.merged_ids()
    names, failed, table, asked = _sync_step(step, coord, nodes, merged_ids)

    def with_table(cfg: Mapping[str, Any], **arrays: ArrayRecord) -> RecordDict:
        return _with_table(table, cfg, **arrays)

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
    votes = _collect_votes(replies, names, len(settings.lambdas), len(table.names), not_scored)
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


def _weights_answer(name: str, r: Message, expected: ExpectedWeights) -> WeightsUpload:
    """The device's head weights and image count, unpacked (``fleet.average.check_upload`` checks
    them against the fleet's); ContributionError when malformed."""
    try:
        cfg = _config(r.content)
        weights = _arrays(r.content, "arrays")
        images = r.content.metric_records["metrics"]["num-examples"]
        base, table, seen = cfg["base"], cfg["table"], cfg["seen"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ContributionError(f"upload without weights, num-examples, base, table or seen ({exc!r})") from None
    if not all(isinstance(v, str) and len(v) <= MAX_NAME_CHARS for v in (base, table)):
        raise ContributionError("upload whose base or table is not a short string")
    local = cfg.get("local", [])
    if not all(isinstance(v, list) and len(v) <= expected.rows for v in (seen, local)):
        raise ContributionError(f"seen and local classes must be lists of at most {expected.rows} table rows")
    prototype = None
    if "prototype" in r.content.array_records:
        try:
            prototype = _arrays(r.content, "prototype")["prototype"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ContributionError(f"unreadable routing prototype ({exc!r})") from None
    return WeightsUpload(
        name,
        base,
        table,
        weights,
        images,  # type: ignore[arg-type]  # checked by fleet.average.check_upload
        tuple(seen),
        packed_bytes(weights) + (0 if prototype is None else prototype.nbytes),
        prototype,
        tuple(local),
    )


def _weights_round(
    grid: Grid, coord: Coordinator, settings: FleetSettings, rnd: int, nodes: list[int], t0: float
) -> RoundReport:
    """A gradient fleet's round: sync, local ``cvm update`` from the fleet's weights, FedAvg or fusion
    of the checked uploads, publish on the coordinator, then on every merged device."""
    step = _Round(grid, settings.timeout_s)
    names, failed, table, asked = _sync_step(step, coord, nodes, {})
    latest = coord.latest()  # one checkpoint load for both
    current, seen = head_weights(latest.weights), latest.seen
    start = {"fleet_round": coord.rounds_done(), "merge": settings.merge}  # the version the weights come from
    config = {
        "seen": list(seen),
        "local-epochs": settings.local_epochs,
        "entry": start,
        "prototype": settings.merge == "fusion",  # each device's routing prototype (fleet.fused)
    }
    out = _weights_record(current)
    replies, failed_nodes = step.ask("train", {n: _with_table(table, config, arrays=out) for n in names})
    failed.update({names[n]: why for n, why in failed_nodes.items()})
    expected = coord.expected_weights(table)
    uploads: list[WeightsUpload] = []
    for n, r in replies.items():
        try:
            uploads.append(_weights_answer(names[n], r, expected))
        except ContributionError as exc:
            failed[names[n]] = f"weights refused: {exc}"
    try:
        merge = merge_weights(
            settings.merge,
            current,
            seen,
            uploads,
            expected,
            asked,
            settings.quorum,
            failed,
            momentum=coord.momentum(latest),
        )
    except QuorumError as exc:
        log.error("round %d: %s; nothing published", rnd, exc)
        return RoundReport.refused(rnd, str(exc), refused=exc.refused)
    for name, why in merge.refused.items():
        log.warning("round %d: device %s left out: %s", rnd, name, why)
    entry = {
        "fleet_round": rnd,
        "merge": settings.merge,
        "devices": list(merge.accepted),
        "left_out": dict(merge.refused),
        "device_images": dict(merge.images),
    }
    version = coord.publish_weights(merge, table, entry)
    digest = weights_digest(merge.weights)
    accepted_nodes = {n: names[n] for n in names if names[n] in merge.accepted}
    merged = _weights_record(merge.weights)
    replies, publish_failed = step.ask(
        "query.publish_weights",
        {
            n: _with_table(table, {"digest": digest, "seen": list(merge.seen), "entry": entry}, arrays=merged)
            for n in accepted_nodes
        },
    )
    for n, why in publish_failed.items():
        log.warning("round %d: device %s did not publish: %s", rnd, names[n], why)
    not_scored = {names[n]: why for n, why in publish_failed.items()}
    votes = _collect_votes(replies, names, 1, len(table.names), not_scored)
    device_acc = {d: _mean(class_accuracy((0.0,), 0.0, v)) for d, v in votes.items()}
    fleet_acc = _mean(class_accuracy((0.0,), 0.0, summed(list(votes.values())))) if votes else None
    weights_bytes = packed_bytes(merge.weights)
    return RoundReport(
        round=rnd,
        version=version,
        published=True,
        fleet_accuracy=fleet_acc,
        device_accuracy=device_acc,
        left_out=dict(merge.refused),
        not_scored=not_scored,
        upload_bytes={u.device: u.wire_bytes for u in uploads if u.device in merge.accepted},
        download_bytes=2 * weights_bytes + len(table.to_bytes()),  # the round's weights out, the merged back
        devices_published={names[n]: _config(r.content).get("version") for n, r in replies.items()},
        wall_s=round(time.perf_counter() - t0, 3),
        step_s=dict(step.seconds),
        classes=len(merge.seen),
        images=int(sum(merge.images.values())),
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
client_app = make_client_app(_store_device, _weights_device)
