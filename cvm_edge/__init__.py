"""cvm-edge: continual visual mapping into a fixed language-model concept space.

Importing the package must stay cheap and torch-free: the serving path imports
``cvm_edge.preprocess`` and ``cvm_edge.concepts`` without torch installed.
"""

__version__ = "0.1.0"
