"""Which int8 weights suit a CPU (deploy/cpu.py): U8S8 where VNNI or ARM multiply exactly, U8U8 on
x86 without VNNI (saturating 16-bit sums), and what a bundle of the other kind is told at load."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.cpu import cpu_flags, fast_int8_weights, int8_mismatch, resolve_int8_weights, this_cpu_int8_weights


@pytest.mark.parametrize(
    ("machine", "flags", "weights"),
    [
        ("x86_64", {"avx2", "fma"}, "uint8"),  # AMD Zen 2/3, older Xeons: VPMADDUBSW saturates U8S8
        ("x86_64", {"avx2", "avx512f", "avx512bw"}, "uint8"),  # AVX-512 without VNNI saturates too
        ("x86_64", {"avx2", "avx512_vnni"}, "int8"),
        ("x86_64", {"avx2", "avx_vnni"}, "int8"),  # Alder Lake and newer client CPUs
        ("AMD64", set(), "uint8"),  # Windows spelling, flags unknown: never saturate
        ("aarch64", set(), "int8"),  # Jetson, Raspberry Pi
        ("arm64", set(), "int8"),  # macOS on Apple silicon
    ],
)
def test_fast_exact_int8_weights_per_cpu(machine: str, flags: set[str], weights: str) -> None:
    assert fast_int8_weights(machine, flags) == weights


def test_cpu_flags_are_read_from_cpuinfo_and_missing_cpuinfo_is_no_flags(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu avx2 avx512_vnni\n\nprocessor\t: 1\n")
    assert cpu_flags(info) == {"fpu", "avx2", "avx512_vnni"}
    assert cpu_flags(tmp_path / "absent") == frozenset()


def test_auto_resolves_to_this_cpu_and_other_choices_are_kept_or_refused() -> None:
    assert resolve_int8_weights("auto") == this_cpu_int8_weights()
    assert resolve_int8_weights("int8") == "int8" and resolve_int8_weights("uint8") == "uint8"
    with pytest.raises(ValueError, match="int8 weights must be one of auto, int8, uint8"):
        resolve_int8_weights("int4")


def test_a_mismatch_names_its_cost_and_the_way_out() -> None:
    assert int8_mismatch("int8", "int8") is None and int8_mismatch("uint8", "uint8") is None
    saturating = int8_mismatch("int8", "uint8")
    slow = int8_mismatch("uint8", "int8")
    assert saturating is not None and "saturate" in saturating and "--int8-weights uint8" in saturating
    assert slow is not None and "slower" in slow and "--int8-weights int8" in slow
