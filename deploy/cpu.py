"""Which int8 weights are fast and exact on this CPU (onnxruntime's CPU kernels, MLAS).

An int8 bundle multiplies uint8 activations by its weights, stored as int8 (U8S8) or uint8 (U8U8):

- x86-64 with VNNI (AVX512-VNNI or AVX-VNNI: Intel since Cascade Lake / Alder Lake, AMD since Zen 4)
  multiplies uint8 x int8 into 32-bit sums: U8S8 is exact and fast. U8U8 has no VNNI instruction and
  falls back to widening kernels: measured on a 2-core AVX512-VNNI Xeon, Lite0 at 224 px, 1 thread,
  U8U8 37 ms, U8S8 5.6 ms, fp32 8.7 ms (U8U8 slower than fp32 by four times).
- x86-64 without VNNI (AVX2 only: AMD Zen 2/3, older Xeons and Atoms) multiplies uint8 x int8 pairs
  into saturating 16-bit sums (VPMADDUBSW): U8S8 overflows there (a barely trained ResNet-18 kept 89 %
  top-1 agreement with fp32 on an AVX2-only EPYC, 99 % as U8U8). U8U8 is exact.
- ARM64 (Jetson, Raspberry Pi) has the signed and unsigned dot-product kernels: U8S8, onnxruntime's
  default.

``cvm export --precision int8`` takes ``--int8-weights auto``: the fast exact choice for the CPU that
exports (the gate is measured there, and on a device it is the CPU that serves). A bundle served on
another kind of CPU still runs; the Predictor warns, naming the way out (:func:`int8_mismatch`).
"""

from __future__ import annotations

import platform
from collections.abc import Iterable
from pathlib import Path

INT8_WEIGHTS = ("auto", "int8", "uint8")
_VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
_X86 = frozenset({"x86_64", "amd64", "i386", "i686", "x86"})


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first processor's flags in ``/proc/cpuinfo`` (empty where there is none: macOS, Windows)."""
    try:
        text = cpuinfo.read_text("utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def fast_int8_weights(machine: str, flags: Iterable[str]) -> str:
    """``int8`` (U8S8) or ``uint8`` (U8U8): the weights that are exact and fast on a CPU of
    architecture ``machine`` (``platform.machine()``) with ``flags``. An x86 CPU whose flags are
    unknown gets uint8: slower where VNNI exists, but never saturated."""
    if machine.lower() not in _X86:
        return "int8"
    return "int8" if _VNNI_FLAGS & set(flags) else "uint8"


def this_cpu_int8_weights() -> str:
    """:func:`fast_int8_weights` for the CPU this process runs on."""
    return fast_int8_weights(platform.machine(), cpu_flags())


def resolve_int8_weights(choice: str) -> str:
    """``auto`` -> this CPU's fast exact weights; ``int8`` / ``uint8`` as given."""
    if choice not in INT8_WEIGHTS:
        raise ValueError(f"int8 weights must be one of {', '.join(INT8_WEIGHTS)}, not {choice!r}")
    return this_cpu_int8_weights() if choice == "auto" else choice


def int8_mismatch(weights: str, here: str) -> str | None:
    """Why a bundle with int8 ``weights`` is a poor fit for a CPU whose fast exact weights are
    ``here`` (None when it fits)."""
    if weights == here:
        return None
    if weights == "int8":
        return (
            "this int8 bundle has int8 weights (U8S8) and this x86 CPU has no VNNI: its 16-bit sums can "
            "saturate, so accuracy may fall below what the export gate measured; export on this machine "
            "(`cvm export --precision int8`, or `--int8-weights uint8`)"
        )
    return (
        "this int8 bundle has uint8 weights (U8U8), which this CPU runs without its fast int8 kernels "
        "(slower than fp32 on VNNI CPUs); export on this machine (`cvm export --precision int8`, or "
        "`--int8-weights int8`)"
    )
