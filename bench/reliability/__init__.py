"""Reliability and security harness (issue 5): kill -9 campaigns, a full disk, concurrent writers,
load during hot reload and fuzzing, against the real `cvm` CLI and a real `cvm serve` process.

Run ``python -m bench.reliability --help``; the tests in ``tests/integration/test_reliability_*.py`` call the
same functions and assert on their figures. RELIABILITY.md states the promises and their tests.
"""
