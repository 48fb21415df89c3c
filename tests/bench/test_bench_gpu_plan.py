"""Sizing and job parsing of the GPU grid tools (bench.gpu_plan, bench.grid --jobs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.gpu_plan import job_cost, main, measured_rate, pack, runs_per_gpu
from bench.grid import parse_job


def test_runs_per_gpu_finish_within_the_time_and_stay_in_bounds() -> None:
    # 386.5 steps/s for 1,150 s is 444,475 steps: five 78,250-step runs fit, six do not.
    assert runs_per_gpu(386.5, 1150, 78250, lo=2, hi=8) == 5
    assert runs_per_gpu(10.0, 1150, 78250, lo=2, hi=8) == 2
    assert runs_per_gpu(1e6, 1150, 78250, lo=2, hi=8) == 8


def test_pack_deals_equal_jobs_in_turn_and_fills_by_cost() -> None:
    jobs = [f"derpp:500:{i}" for i in range(7)]
    assert pack(jobs, 2, 3) == [jobs[0:6:2], jobs[1:6:2]]
    assert pack(jobs[:1], 2, 3) == [jobs[:1], []]
    # Three fine-tune runs (32 images a step) weigh one DER++ run (96): a GPU with room for 2 DER++
    # runs takes 1 DER++ run and 3 fine-tune runs.
    light = ["derpp:500:0", "finetune:0:0", "finetune:0:1", "finetune:0:2", "finetune:0:3"]
    assert job_cost("finetune:0:0") * 3 == job_cost("derpp:500:0") == 1.0
    assert pack(light, 1, 2) == [light[:4]]


def test_measured_rate_uses_the_largest_process_count_and_skips_errors() -> None:
    speed = {
        "rows": [
            {"mode": "graph-bf16", "processes": 1, "steps_per_s_total": 141.5},
            {"mode": "graph-bf16", "processes": 6, "steps_per_s_total": 386.5},
            {"mode": "graph-bf16", "processes": 12, "error": "RuntimeError()"},
        ]
    }
    assert measured_rate(speed, "graph-bf16") == 386.5
    with pytest.raises(SystemExit, match="no eager"):
        measured_rate(speed, "eager")


def test_plan_prints_one_line_per_gpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    speed = tmp_path / "s.json"
    speed.write_text(json.dumps({"rows": [{"mode": "graph-bf16", "processes": 6, "steps_per_s_total": 200.0}]}))
    jobs = "derpp:500:0,cvm-derpp:500:0,derpp:500:1,cvm-derpp:500:1,derpp:500:2"
    assert (
        main(["--speed", str(speed), "--seconds", "800", "--gpus", "2", "--steps-per-run", "78250", "--jobs", jobs])
        == 0
    )
    assert capsys.readouterr().out.splitlines() == ["0 derpp:500:0,derpp:500:1", "1 cvm-derpp:500:0,cvm-derpp:500:1"]


def test_parse_job() -> None:
    assert parse_job("derpp:500:2") == ("derpp", 500, 2)
    assert parse_job("finetune:500:1") == ("finetune", 0, 1)  # no buffer: recorded as 0
    with pytest.raises(SystemExit, match="METHOD:BUFFER:SEED"):
        parse_job("derpp:500")
    with pytest.raises(SystemExit, match="unknown method"):
        parse_job("nope:500:0")
