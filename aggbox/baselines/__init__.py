"""The systems AggBox is measured against (docs/measurement.md names them)."""

from __future__ import annotations

import numpy as np

from aggbox.errors import AggBoxError


def result_buffer(out: np.ndarray, tensor: np.ndarray) -> np.ndarray:
    """``out`` as the flat float32 array an allreduce writes its result into: checked to
    be C-contiguous float32 with the tensor's size (the caller's buffer, as AggBox's
    ``Allreducer.allreduce(out=...)`` takes it)."""
    if (out.dtype != np.float32 or not out.flags.c_contiguous
            or out.size != np.size(tensor)):
        raise AggBoxError(f"out must be a C-contiguous float32 array of {np.size(tensor)} "
                          f"values, got {out.dtype} of shape {out.shape}")
    return out.reshape(-1)
