"""Issue 5, item 5: over 300 seeded malformed payloads against every endpoint that takes input
(/v1/classify raw and multipart, its query string, v2 infer): never a 5xx, never a dropped
connection or a dead server, every error a JSON {"error": ...}."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import trained_store

from bench.reliability.common import real_jpegs, record, running_server
from bench.reliability.fuzz import payloads, run_fuzz

SEED = int(os.environ.get("CVM_FUZZ_SEED", "0"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, fashion_table: Path) -> Iterator[Any]:
    wd = trained_store(tmp_path_factory, fashion_table, tmp_path_factory.mktemp("fuzz") / "w")
    log = tmp_path_factory.mktemp("fuzz-log") / "server.log"
    with running_server(["--workdir", str(wd), "--threads", "1"], log) as s:
        yield s


def test_corpus_is_reproducible_and_large_enough() -> None:
    jpegs = real_jpegs(4)
    a, b = payloads(jpegs, 32, SEED), payloads(jpegs, 32, SEED)
    assert a == b and len(a) >= 300
    assert len({p.family for p in a}) >= 10
    assert payloads(jpegs, 32, SEED + 1) != a  # the seed matters


def test_malformed_payloads_never_take_the_server_down(server: Any) -> None:
    corpus = payloads(real_jpegs(4), 32, SEED)
    report = run_fuzz(server.url, corpus, lambda: server.proc.poll() is None)
    figures = report.figures()
    print(figures["status_counts"])
    assert figures["n_violations"] == 0, figures["violations"]
    assert report.sent == len(corpus) >= 300
    assert not any(int(s) >= 500 for s in figures["status_counts"])
    assert server.proc.poll() is None
    log = server.log()
    assert "Traceback" not in log and "unhandled error" not in log, log[-3000:]
    record("fuzz", {"seed": SEED, **figures})
