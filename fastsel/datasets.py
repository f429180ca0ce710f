"""Deprecated: moved to ``fastsel.experiments.datasets`` (issue 20). Importing this name still
works, with a DeprecationWarning, and gives that module itself."""
from ._moved import alias

alias(__name__)
