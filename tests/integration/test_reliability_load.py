"""Issue 5, item 4: 60 s, 16 concurrent clients on loopback posting real JPEGs to /v1/classify while
5 bundles are published. Marked `reliability`: deselected by default, run by `make reliability`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_helpers import trained_store

from bench.reliability.common import Server, current_bundle_name, real_jpegs, record, run_cvm, running_server
from bench.reliability.load import republish, run_load

pytestmark = pytest.mark.reliability
DURATION_S = float(os.environ.get("CVM_LOAD_SECONDS", "60"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, fashion_table: Path) -> Path:
    """The small trained store with its checkpoint exported in all three precisions (CURRENT: int8)."""
    wd = trained_store(tmp_path_factory, fashion_table, tmp_path_factory.mktemp("load") / "w")
    for precision in ("fp16", "int8"):
        proc = run_cvm("-q", "export", "--workdir", str(wd), "--precision", precision)
        assert proc.returncode == 0, proc.stderr
    return wd


@pytest.fixture(scope="module")
def server(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("load-log") / "server.log"
    with running_server(["--workdir", str(workdir), "--poll-interval", "0.5"], log) as s:
        yield s


def test_load_during_five_publishes(workdir: Path, server: Server) -> None:
    sources = {"fp32": "v000002", "fp16": "v000002-fp16", "int8": "v000002-int8"}

    def publish(precision: str) -> str:
        name = republish(workdir, sources[precision])
        assert current_bundle_name(workdir) == name
        return name

    figures = run_load(server, real_jpegs(64), publish, duration_s=DURATION_S, clients=16, publishes=5)
    print(figures)
    assert figures["requests"] > 0
    assert figures["non_2xx"] == 0 and figures["transport_errors"] == 0, figures["errors_sample"]
    assert len(figures["bundles_published"]) == 5
    assert figures["published_and_served"] == 5, figures
    assert figures["rss_growth"] < 0.10, figures["rss_mb"]
    assert server.alive() and "unhandled error" not in server.log()
    record("load", figures)
