"""Offline concept-table job: embed class names with a frozen sentence-transformers model.

Runs on a workstation (or in CI); the device only ever reads the resulting table.
"""
