"""The domain-incremental protocol cifar10-domains: the shifts, the scenario, a CPU run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench import run as bench_run
from bench.datasets import _decode_jpegs
from bench.domains import SHIFTS, apply_domain, domain_seed, gaussian_blur, greyscale, jpeg_artefacts, low_light
from bench.metrics import final_average, forgetting_per_task
from bench.protocols import PROTOCOLS, build_scenario
from conftest import SHARED_DATA, render_report

DOMAINS = ("clean", "greyscale", "low-light", "blur", "jpeg")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CVM_BENCH_CACHE", str(tmp_path_factory.getbasetemp() / "bench-cache"))


@pytest.fixture(scope="module")
def colour(sample: dict[str, np.ndarray]) -> np.ndarray:
    """Colour images of real content: three different Fashion-MNIST images as the R, G and B
    channels, upscaled to 32 px (the sample itself is grey, and greyscale must have colour to remove)."""
    g = sample["train_images"][:48, ..., 0] if sample["train_images"].ndim == 4 else sample["train_images"][:48]
    rgb = np.stack([g[0:16], g[16:32], g[32:48]], axis=-1)
    return np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.Resampling.BICUBIC)) for im in rgb])


@pytest.mark.parametrize("name", DOMAINS)
def test_every_shift_keeps_shape_dtype_and_is_deterministic_per_seed(colour: np.ndarray, name: str) -> None:
    before = colour.copy()
    out = SHIFTS[name](colour, 5)
    assert out.shape == colour.shape and out.dtype == np.uint8
    assert np.array_equal(out, SHIFTS[name](colour, 5))
    assert np.array_equal(colour, before) and out is not colour  # the input is never modified
    with pytest.raises(ValueError, match="uint8"):
        SHIFTS[name](colour.astype(np.float32), 5)


def test_greyscale_is_bt601_luma_in_every_channel(colour: np.ndarray) -> None:
    out = greyscale(colour, 0)
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
    pil = np.stack([np.asarray(Image.fromarray(im).convert("L")) for im in colour])
    assert np.abs(out[..., 0].astype(int) - pil).max() <= 1
    assert np.abs(out.astype(int) - colour).mean() > 5  # the colour really went


def test_low_light_darkens_every_pixel_by_a_seeded_exposure(colour: np.ndarray) -> None:
    out = low_light(colour, 1)
    assert np.all(out <= colour)
    ratio = out.reshape(len(out), -1).mean(1) / colour.reshape(len(colour), -1).mean(1)
    assert np.all(ratio < 0.6) and np.all(ratio > 0.05), ratio
    assert not np.array_equal(out, low_light(colour, 2))


def _edge_energy(images: np.ndarray) -> float:
    x = images.astype(np.float32)
    return float(np.abs(np.diff(x, axis=1)).mean() + np.abs(np.diff(x, axis=2)).mean())


def test_blur_removes_edges_with_a_seeded_strength(colour: np.ndarray) -> None:
    out = gaussian_blur(colour, 1)
    assert _edge_energy(out) < 0.6 * _edge_energy(colour)
    assert abs(float(out.mean()) - float(colour.mean())) < 3  # blur moves detail, not brightness
    assert not np.array_equal(out, gaussian_blur(colour, 2))


def test_jpeg_leaves_8x8_block_artefacts(colour: np.ndarray) -> None:
    out = jpeg_artefacts(colour, 1)
    assert np.abs(out.astype(int) - colour).mean() > 2
    # The artefact of block coding: steps across 8x8 block edges grow more than steps inside blocks.
    step = lambda im: np.abs(np.diff(im.astype(np.float32), axis=2)).mean(axis=(0, 1, 3))  # noqa: E731
    growth = step(out) - step(colour)
    border = growth[[7, 15, 23]].mean()
    inside = np.delete(growth, [7, 15, 23]).mean()
    assert border > inside + 1.0, (border, inside)
    assert not np.array_equal(out, jpeg_artefacts(colour, 2))


def test_domain_seeds_are_fixed_per_domain_and_split(colour: np.ndarray) -> None:
    assert domain_seed(2, "train") != domain_seed(2, "test") != domain_seed(3, "test")
    assert np.array_equal(apply_domain("low-light", colour, 2, "test"), low_light(colour, domain_seed(2, "test")))
    with pytest.raises(ValueError, match="unknown domain"):
        apply_domain("fog", colour, 0, "test")


def test_scenario_has_one_task_per_domain_with_every_class() -> None:
    s = build_scenario(PROTOCOLS["cifar10-domains"], 3, use_demo=True)
    assert s.domains == DOMAINS
    assert s.tasks == (tuple(range(10)),) * 5
    assert build_scenario(PROTOCOLS["cifar10-domains"], 3, use_demo=True, n_tasks=2).domains == DOMAINS[:2]


@pytest.mark.skipif(not (SHARED_DATA / "cifar10" / "test.npz").is_file(), reason="needs ../shared/data/cifar10")
def test_every_shift_changes_real_cifar10_images() -> None:
    with np.load(SHARED_DATA / "cifar10" / "test.npz") as z:
        images = _decode_jpegs(z["jpeg"], z["offsets"][:65], 32)
    for j, name in enumerate(DOMAINS[1:], start=1):
        diff = np.abs(apply_domain(name, images, j, "test").astype(int) - images).mean()
        assert diff > 2, (name, diff)


def test_smoke_run_fills_the_domain_matrix_and_the_report(tmp_path: Path) -> None:
    argv = ["--protocol", "cifar10-domains", "--method", "cvm-er-distill", "--out", str(tmp_path)]
    tiny = ["--smoke", "--demo", "--train-per-class", "10", "--test-per-class", "10", "--threads", "1"]
    assert bench_run.main(argv + tiny) == 0
    folder = tmp_path / "smoke" / "cifar10-domains"
    rec = json.loads((folder / "cvm-er-distill-b200-s0.json").read_text())
    a = rec["acc_matrix"]
    assert len(a) == 5 and all(len(row) == 5 and None not in row for row in a)
    assert rec["domains"] == list(DOMAINS) and rec["tasks"] == [list(range(10))] * 5
    assert rec["final_avg_acc"] == pytest.approx(final_average(a), abs=1e-3)
    assert (
        rec["forgetting_per_task"] == pytest.approx(forgetting_per_task(a)) and rec["forgetting_per_task"][-1] is None
    )
    shift = {d["domain"]: d["test_mean_abs_diff"] for d in rec["domain_shift"]}
    assert shift["clean"] == 0
    assert shift["greyscale"] == 0  # the embedded sample is grey already: no colour to remove
    assert all(shift[d] > 2 for d in ("low-light", "blur", "jpeg")), shift
    # the buffer keeps images of every domain seen (40 entries per task of 200)
    assert [t["buffer_by_task"] for t in rec["per_task"]][-1] == {str(k): 40 for k in range(5)}
    # the report renders the protocol with per-domain figures
    text = render_report(folder, "cifar10-domains", tmp_path)
    assert "Tasks: 5 domains of the same 10 classes (clean, greyscale, low-light, blur, jpeg)" in text
    assert "| method | buffer | seeds | clean | greyscale | low-light | blur | jpeg |" in text
    assert "| cvm-er-distill | 200 | 0 |" in text
