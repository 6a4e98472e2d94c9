"""The weight importer's errors."""
from __future__ import annotations

import pickle


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A pickle asked for a global outside the allowed set; nothing of it was executed."""


class WeightImportError(ValueError):
    """The checkpoint does not fit the model (missing, unexpected, mis-shaped keys...)."""


class DamagedWeightsError(WeightImportError):
    """A weight file that cannot be parsed: cut short, or its bytes damaged."""
