"""Errors raised on purpose: the message names the setting, its value and the fix.

The command-line entry points (``train.py``, ``unlearn.py``) print such an error's message alone and exit with
status 2; ``DELTA_INFLUENCE_TRACEBACK=1`` shows the traceback too. Any other exception keeps its traceback.
"""


class DeltaInfluenceError(Exception):
    """Base of the errors the project raises on purpose."""


class ConfigError(DeltaInfluenceError, ValueError):
    """A setting, an input or the data does not fit what it is used for."""


class UnsupportedModelError(DeltaInfluenceError, TypeError):
    """The model has nothing the method can work with."""


class DeltaInfluenceWarning(UserWarning):
    """A warning the project gives on purpose: a setting that weakens what it measures, a step that did not do what it
    was for. The command line shows its message alone, without the line of code that raised it."""
