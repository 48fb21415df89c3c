"""Which int8 weights suit a CPU (deploy/cpu.py): U8S8 where VNNI or ARM multiply exactly, U8U8 on
x86 without VNNI (saturating 16-bit sums), and what a bundle of a kind that does not suit is told."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.cpu import cpu_flags, int8_fit, preferred_int8_weights, resolve_int8_weights, suited_int8_weights

AVX2 = {"avx2", "fma"}
VNNI = {"avx2", "avx512_vnni"}


@pytest.mark.parametrize(
    ("machine", "flags", "suited", "preferred"),
    [
        ("x86_64", AVX2, {"uint8"}, "uint8"),  # AMD Zen 2/3, older Xeons: VPMADDUBSW saturates U8S8
        ("x86_64", {"avx2", "avx512f", "avx512bw"}, {"uint8"}, "uint8"),  # AVX-512 without VNNI too
        ("x86_64", VNNI, {"int8"}, "int8"),  # U8U8 has no VNNI kernel: four times slower than fp32
        ("x86_64", {"avx2", "avx_vnni"}, {"int8"}, "int8"),  # Alder Lake and newer client CPUs
        ("x86_64", {"avx_vnni", "avx_vnni_int8"}, {"int8", "uint8"}, "int8"),  # VNNI for u8 x u8 too
        ("x86_64", {"AVX2", "AVX512VNNI"}, {"int8"}, "int8"),  # numpy's names (no /proc/cpuinfo)
        ("AMD64", set(), {"uint8"}, "uint8"),  # Windows spelling, flags unknown: never saturate
        ("aarch64", set(), {"int8", "uint8"}, "int8"),  # Jetson, Raspberry Pi: dot-product kernels
        ("arm64", set(), {"int8", "uint8"}, "int8"),  # macOS on Apple silicon
    ],
)
def test_suited_and_preferred_int8_weights_per_cpu(
    machine: str, flags: set[str], suited: set[str], preferred: str
) -> None:
    assert suited_int8_weights(machine, flags) == suited
    assert preferred_int8_weights(machine, flags) == preferred


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu avx2 avx512_vnni\n\nprocessor\t: 1\n")
    assert cpu_flags(info) == {"fpu", "avx2", "avx512_vnni"}


def test_without_cpuinfo_the_flags_are_numpys_runtime_features(tmp_path: Path) -> None:
    import numpy as np

    flags = cpu_flags(tmp_path / "absent")
    assert isinstance(flags, frozenset)
    if np.lib.NumpyVersion(np.__version__) >= "2.0.0":  # numpy 2 detects SSE2 on every x86-64 and ASIMD on ARM64
        assert flags & {"SSE2", "ASIMD", "NEON"}


def test_other_choices_are_kept_and_unknown_ones_refused() -> None:
    assert resolve_int8_weights("int8") == "int8" and resolve_int8_weights("uint8") == "uint8"
    assert resolve_int8_weights("auto") in ("int8", "uint8")
    with pytest.raises(ValueError, match="int8 weights must be one of auto, int8, uint8"):
        resolve_int8_weights("int4")


def test_a_poor_fit_names_its_cost_and_the_way_out() -> None:
    assert int8_fit("int8", "x86_64", VNNI) is None and int8_fit("uint8", "x86_64", AVX2) is None
    assert int8_fit("uint8", "aarch64", ()) is None and int8_fit(None, "aarch64", ()) is None
    saturating = int8_fit("int8", "x86_64", AVX2)
    slow = int8_fit("uint8", "x86_64", VNNI)
    unknown = int8_fit(None, "x86_64", VNNI)
    assert saturating is not None and "saturate" in saturating and "--int8-weights uint8" in saturating
    assert slow is not None and "slower than fp32" in slow and "--int8-weights int8" in slow
    assert unknown is not None and "does not record its weight kind" in unknown
    assert all("cvm export --precision int8" in m for m in (saturating, slow, unknown))
