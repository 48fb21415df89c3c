"""The lab: methods that do not win by default, kept working, tested and measured.

Each module is one method (or the arithmetic one method needs); none is on the path of the
defaults. The spine reaches them only through the seams that ARCHITECTURE.md lists and
``tests/unit/test_architecture.py`` enforces, and the ``cvm`` command line only with ``--experimental``.

- ``experts``: per-task low-rank experts on the mapper, routed by feature anchors (HiDe-LLaVA);
- ``routing``: the routed ConDU model (one expert model per task, picked by prototypes);
- ``fusion``, ``fusion_state``, ``fusion_plugin``: continual data-free fusion (ConDU); the fleet's
  ``fusion`` merge uses the same arithmetic;
- ``similarity``: task-similarity scaling of the distillation and EWC weights;
- ``align``: the plugin that pulls incoming embeddings onto their own row.

The benchmarks' GPU speed-ups (bf16, compile, the CUDA-graph step) are not lab methods but a trainer
backend of the harness (``bench/speed.py``, through ``cvm_edge.trainer_backend``).
"""
