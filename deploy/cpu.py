"""Which int8 weights are fast and exact on this CPU (onnxruntime's CPU kernels, MLAS).

An int8 bundle multiplies uint8 activations by its weights, stored as int8 (U8S8) or uint8 (U8U8):

- x86-64 with VNNI (AVX512-VNNI or AVX-VNNI: Intel since Cascade Lake / Alder Lake, AMD since Zen 4)
  multiplies uint8 x int8 into 32-bit sums: U8S8 is exact and fast. U8U8 has no VNNI instruction
  (until AVX-VNNI-INT8) and falls back to widening kernels: measured on a 2-core AVX512-VNNI Xeon,
  Lite0 at 224 px, 1 thread, U8U8 37 ms, U8S8 5.6 ms, fp32 8.7 ms (U8U8 slower than fp32 by four times).
- x86-64 without VNNI (AVX2 only: AMD Zen 2/3, older Xeons and Atoms) multiplies uint8 x int8 pairs
  into saturating 16-bit sums (VPMADDUBSW): U8S8 overflows there (a barely trained ResNet-18 kept 89 %
  top-1 agreement with fp32 on an AVX2-only EPYC, 99 % as U8U8). U8U8 is exact.
- ARM64 (Jetson, Raspberry Pi, Apple silicon) runs both through its dot-product kernels (onnxruntime's
  docs: U8S8 is the faster of the two only on low-end ARM64), with no saturation: either suits; U8S8
  is preferred.

``cvm export --precision int8`` takes ``--int8-weights auto``: the preferred kind for the CPU that
exports (the gate is measured there, and on a device it is the CPU that serves). A bundle served on a
CPU that its kind does not suit still runs; the Predictor warns, naming the way out (:func:`int8_fit`).
"""

from __future__ import annotations

import platform
from collections.abc import Iterable
from pathlib import Path

INT8_WEIGHTS = ("auto", "int8", "uint8")
# /proc/cpuinfo's names (AMX CPUs list avx512_vnni too); numpy's names where there is no /proc
_VNNI = frozenset({"avx512_vnni", "avx_vnni", "amx_int8", "AVX512VNNI", "AVXVNNI"})
_VNNI_INT8 = frozenset({"avx_vnni_int8", "AVXVNNIINT8"})  # a VNNI instruction for uint8 x uint8 too
_X86 = frozenset({"x86_64", "amd64", "i386", "i686", "x86"})


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first processor's flags in ``/proc/cpuinfo``; where there is none (macOS, Windows), the
    features numpy detected at import (its own runtime dispatch), or none."""
    try:
        text = cpuinfo.read_text("utf-8", errors="replace")
    except OSError:
        return _numpy_features()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return _numpy_features()


def _numpy_features() -> frozenset[str]:
    try:
        from numpy._core._multiarray_umath import __cpu_features__  # private: a fallback only
    except ImportError:
        return frozenset()
    return frozenset(k for k, on in __cpu_features__.items() if on)


def suited_int8_weights(machine: str, flags: Iterable[str]) -> frozenset[str]:
    """The int8 weight kinds that are exact and fast on a CPU of architecture ``machine``
    (``platform.machine()``) with ``flags``. An x86 CPU whose flags are unknown is taken to have no
    VNNI: uint8, slower where VNNI exists but never saturated."""
    if machine.lower() not in _X86:
        return frozenset({"int8", "uint8"})
    have = set(flags)
    if not _VNNI & have:
        return frozenset({"uint8"})
    return frozenset({"int8", "uint8"}) if _VNNI_INT8 & have else frozenset({"int8"})


def preferred_int8_weights(machine: str, flags: Iterable[str]) -> str:
    """What ``auto`` exports for such a CPU: int8 (U8S8) wherever it suits, else uint8 (U8U8)."""
    return "int8" if "int8" in suited_int8_weights(machine, flags) else "uint8"


def resolve_int8_weights(choice: str) -> str:
    """``auto`` -> this CPU's preferred kind; ``int8`` / ``uint8`` as given."""
    if choice not in INT8_WEIGHTS:
        raise ValueError(f"int8 weights must be one of {', '.join(INT8_WEIGHTS)}, not {choice!r}")
    return preferred_int8_weights(platform.machine(), cpu_flags()) if choice == "auto" else choice


def int8_fit(weights: str | None, machine: str, flags: Iterable[str]) -> str | None:
    """Why an int8 bundle with ``weights`` (None: not recorded) is a poor fit for this CPU; None
    when it suits."""
    suited = suited_int8_weights(machine, flags)
    if weights in suited:
        return None
    redo = "export it on this machine (`cvm export --precision int8`)"
    if weights is None:
        if len(suited) > 1:
            return None  # either kind suits this CPU
        return (
            "this int8 bundle does not record its weight kind (exported before cvm-edge recorded it): it may "
            "have the kind this CPU runs slowly (uint8 weights on VNNI CPUs) or saturates (int8 weights "
            f"without VNNI); {redo}"
        )
    if weights == "int8":
        return (
            "this int8 bundle has int8 weights (U8S8) and this x86 CPU has no VNNI: its 16-bit sums can "
            f"saturate, so accuracy may fall below what the export gate measured; {redo}, or pass "
            "`--int8-weights uint8`"
        )
    return (
        "this int8 bundle has uint8 weights (U8U8), which this x86 CPU runs without its VNNI kernels "
        f"(measured four times slower than fp32 on a VNNI Xeon); {redo}, or pass `--int8-weights int8`"
    )


def this_cpu_int8_fit(weights: str | None) -> str | None:
    """:func:`int8_fit` for the CPU this process runs on."""
    return int8_fit(weights, platform.machine(), cpu_flags())
