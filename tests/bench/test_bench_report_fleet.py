"""bench.report's fleet plot: the round axis of a panel holding only one-round (analytic) runs."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench import report


def test_one_round_panel_has_whole_round_ticks() -> None:
    fig, ax = plt.subplots()
    ax.plot([1], [65.7], marker="o")
    report.round_axis(ax, 1)
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    plt.close(fig)
    assert ticks == [1.0]


def test_plot_fleet_writes_the_png(tmp_path: Path) -> None:
    results = Path(__file__).resolve().parents[2] / "bench" / "results"
    assert report.plot_fleet(results, tmp_path) == ["fleet-rounds.png"]
    assert (tmp_path / "fleet-rounds.png").stat().st_size > 0
