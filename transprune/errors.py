"""Errors shared across modules (kept here so no module imports another just for an exception)."""


class UnsupportedModelError(TypeError):
    """The model is not one of the supported families, or a stage does not run on it."""


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to try."""


class PruningInputError(ValueError):
    """The inputs cannot be pruned as given; the message says what to pass instead."""
