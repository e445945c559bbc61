"""Calibration data as the list of batches the engine runs the model on."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gptq_jax.core.calibration import Calibration


def calibration_batches(calib: Any, batch_size: int) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """(batches, token masks or None per batch, description). ``calib``: a ``Calibration``, an int array
    ``[samples, seqlen]``, or an iterable of batches (any pytree)."""
    if isinstance(calib, Calibration):
        out, masks = [], []
        for i in range(0, calib.tokens.shape[0], batch_size):
            tok, m = jnp.asarray(calib.tokens[i : i + batch_size]), jnp.asarray(calib.mask[i : i + batch_size])
            out.append({"tokens": tok, "attention_mask": m})
            masks.append(m)
        desc = {"samples": int(calib.tokens.shape[0]), "seqlen": int(calib.tokens.shape[1]),
                "tokens": calib.num_tokens}
        return out, masks, desc
    if isinstance(calib, (np.ndarray, jax.Array)):
        a = np.asarray(calib)
        if a.ndim != 2 or not np.issubdtype(a.dtype, np.integer):
            raise ValueError(
                f"calibration must be int token ids [samples, seqlen] (or a Calibration, or an iterable of batches); "
                f"got an array of shape {a.shape} and dtype {a.dtype}"
            )
        if a.size == 0:
            raise ValueError(f"calibration is empty (shape {a.shape})")
        if a.min() < 0:
            raise ValueError(f"calibration token ids must be >= 0, got a minimum of {a.min()}")
        out = [jnp.asarray(a[i : i + batch_size]) for i in range(0, a.shape[0], batch_size)]
        return out, [None] * len(out), {"samples": int(a.shape[0]), "seqlen": int(a.shape[1]), "tokens": int(a.size)}
    if isinstance(calib, Iterable) and not isinstance(calib, (str, bytes, dict)):
        out = list(calib)
        if not out:
            raise ValueError("calibration is an empty iterable: give at least one batch")
        return out, [None] * len(out), {"batches": len(out)}
    raise TypeError(
        f"calib must be a Calibration, an int array [samples, seqlen] or an iterable of batches, got {type(calib)}"
    )
