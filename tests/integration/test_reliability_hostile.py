"""Issue 18, server part: what hostile inputs cost a real `cvm serve` on this machine. The hostile
corpus (bombs, aspect ratios, slow decodes, output amplification, overflowing inputs, on every
input path) gets no 5xx; 64 concurrent decompression-bomb clients leave the server under 600 MB;
`/v2/health/live` answers within 100 ms (p99) while 40 clients send slow-to-decode images; forced
reloads under load give their memory back.
Marked `reliability` (timed, about 1.5 minutes): run by `make reliability`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_helpers import ADMIN_TOKEN, trained_store

from bench.reliability.common import Server, real_jpegs, record, running_server
from bench.reliability.hostile import (
    corpus,
    hard_images,
    run_bombs,
    run_corpus,
    run_health_under_decode,
    run_reload_storm,
)

pytestmark = pytest.mark.reliability
HEALTH_SECONDS = float(os.environ.get("CVM_HEALTH_SECONDS", "20"))
RSS_LIMIT_MB = 600
HEALTH_P99_LIMIT_MS = 100


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, fashion_table: Path) -> Iterator[Server]:
    wd = trained_store(tmp_path_factory, fashion_table, tmp_path_factory.mktemp("hostile-rel") / "w")
    log = tmp_path_factory.mktemp("hostile-rel-log") / "server.log"
    env = {"CVM_ADMIN_TOKEN": ADMIN_TOKEN}
    with running_server(["--workdir", str(wd)], log, env=env) as s:  # the shipped defaults
        yield s


def test_the_hostile_corpus_gets_no_5xx(server: Server) -> None:
    figures = run_corpus(server.url, server.rss_bytes, corpus(32))
    print(figures)
    assert figures["responses_5xx"] == 0 and figures["no_answer_or_not_json"] == 0, figures
    assert figures["peak_rss_mb"] < RSS_LIMIT_MB, figures
    assert server.alive() and "Traceback" not in server.log()
    record("hostile_corpus", figures)


def test_64_concurrent_bomb_clients_stay_under_600_mb(server: Server) -> None:
    figures = run_bombs(server.url, server.rss_bytes, concurrency=64)
    print(figures)
    assert figures["responses_5xx"] == 0 and figures["no_answer_or_not_json"] == 0, figures
    assert figures["by_family"]["bomb v2"] == {"413": 64}, figures
    assert figures["peak_rss_mb"] < RSS_LIMIT_MB, figures
    record("hostile_bombs", figures)


def test_health_answers_while_40_clients_send_slow_images(server: Server) -> None:
    figures = run_health_under_decode(server.url, hard_images(), clients=40, duration_s=HEALTH_SECONDS)
    print(figures)
    assert figures["health_failures"] == 0, figures
    assert all(not s.startswith("5") for s in figures["image_requests"]), figures
    assert figures["health_p99_ms"] < HEALTH_P99_LIMIT_MS, figures
    record("hostile_health_under_decode", figures)


def test_forced_reloads_under_load_give_their_memory_back(server: Server) -> None:
    figures = run_reload_storm(server.url, server.rss_bytes, ADMIN_TOKEN, real_jpegs(1)[0], duration_s=15)
    print(figures)
    assert figures["forced_reloads"] > 5 and all(not k.startswith("5") for k in figures["statuses"]), figures
    assert figures["peak_rss_mb"] < RSS_LIMIT_MB, figures
    assert figures["idle_rss_mb"] < 1.25 * figures["baseline_rss_mb"], figures
    record("hostile_reload_storm", figures)
