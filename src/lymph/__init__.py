"""lymph: reactive vs malignant lymphocytosis from blood-smear cells and clinical data.

Two stages with a feature store between them:

    data (challenge layout / synth) -> image cache (zarr) -> encoder (stage one)
        -> embedding store (HDF5) -> head (stage two) -> report
"""

__version__ = "0.1.0"

from lymph.errors import LymphError

__all__ = ["LymphError", "__version__"]
