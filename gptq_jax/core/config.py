"""What the user means by a quantization: bits, groups, symmetry, ordering, damping.

How a kernel is tuned (tile sizes, warps) lives with the kernels, not here.
"""

from __future__ import annotations

import dataclasses

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """GPTQ settings. Frozen and hashable, so it can be a static argument to ``jax.jit``.

    The field names follow the ``quantization_config`` of GPTQ checkpoints where one exists
    (``bits``, ``group_size``, ``sym``, ``desc_act`` is ``act_order`` here, ``static_groups``,
    ``damp_percent``).
    """

    bits: int = 4
    # Input columns sharing one scale/zero per output row; -1 means one grid per output row
    # ("per channel"). K need not be a multiple: the last group is then partial, and
    # ceil(K / group_size) groups are stored, as the checkpoint format does.
    group_size: int = 128
    # Symmetric grids fix zero = 2**(bits-1); asymmetric grids fit min and max of each group.
    sym: bool = True
    # Visit columns in descending order of diag(H) (the paper's "act-order" / desc_act).
    act_order: bool = False
    # Fix every group's grid from the unquantized weight before the solve, so act-order
    # keeps a monotone g_idx (no gather in the kernels).
    static_groups: bool = False
    # Group-aware reordering (GPTQModel's ``act_group_aware``, its default without desc_act): visit the full groups
    # in descending order of their largest diag(H), and each group's columns in descending diag(H); a partial last
    # group stays last, in its own order. Each group keeps its own grid, so ``g_idx`` stays ``k // group_size`` and
    # checkpoints need nothing new. Needs groups (group_size > 0); excludes act_order.
    act_group_aware: bool = False
    # Dampening added to diag(H), as a fraction of its mean (GPTQ, Sec. 4 "Cholesky reformulation").
    damp_percent: float = 0.01
    # Round each grid's scale to float16, the dtype checkpoints store scales in, as soon as it is fitted: the
    # solver's error feedback, the weights the next block is calibrated on and the file then all hold one weight.
    # False fits float32 scales that only the file rounds (the paper's code and GPTQModel). On SmolLM2, mean
    # perplexity over calibration seeds, rounding at the fit against not: 3-bit g128 asym 21.26 vs 22.39 (4 seeds),
    # 3-bit sym 31.09 vs 31.63, 4-bit act-order 11.288 vs 11.346, 4-bit sym 13.622 vs 13.527 (3 seeds each); each
    # is within the seed-to-seed spread but the first (benchmarks/investigations/scale_rounding_seeds.py).
    fp16_scales: bool = True
    # Columns per lazy batch (GPTQ, Alg. 1). A speed knob only: results do not depend on it.
    block_size: int = 128
    # Search the grid's range by shrinking min/max and keeping the one with the lowest
    # |w - q|^norm error, as the paper's reference quantizer does with ``mse=True``.
    mse: bool = False
    mse_norm: float = 2.4
    mse_grid: int = 100
    mse_max_shrink: float = 0.8

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits!r} is not supported; choose one of {SUPPORTED_BITS}")
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool):
            raise ValueError(f"group_size={self.group_size!r} must be an int (-1 for per-channel)")
        if self.group_size == 0 or self.group_size < -1:
            raise ValueError(f"group_size={self.group_size} must be -1 (per-channel) or a positive number of columns")
        if self.act_group_aware and self.act_order:
            raise ValueError(
                "act_group_aware=True and act_order=True exclude each other: act_order visits columns across groups "
                "by diag(H), act_group_aware reorders whole groups; choose one"
            )
        if self.act_group_aware and self.group_size == -1:
            raise ValueError(
                "act_group_aware=True needs groups, but group_size=-1 (per channel) has one group per row; "
                "use a positive group_size or act_order=True"
            )
        if not (0.0 < self.damp_percent <= 1.0):
            raise ValueError(f"damp_percent={self.damp_percent} must be in (0, 1]")
        if self.block_size <= 0:
            raise ValueError(f"block_size={self.block_size} must be positive")
        if self.mse:
            if self.mse_norm <= 0:
                raise ValueError(f"mse_norm={self.mse_norm} must be positive")
            if self.mse_grid <= 0:
                raise ValueError(f"mse_grid={self.mse_grid} must be positive")
            if not (0.0 < self.mse_max_shrink < 1.0):
                raise ValueError(f"mse_max_shrink={self.mse_max_shrink} must be in (0, 1)")

    @property
    def maxq(self) -> int:
        """Largest integer code: codes live in [0, maxq]."""
        return (1 << self.bits) - 1

    def groups(self, in_features: int) -> int:
        """Number of groups for a layer with ``in_features`` input columns: ceil(K / g)."""
        g = in_features if self.group_size == -1 else self.group_size
        return -(-in_features // g)

    def effective_group_size(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def check_in_features(self, in_features: int) -> None:
        """Raise if this config cannot quantize a layer with ``in_features`` input columns."""
        if self.group_size > in_features:
            raise ValueError(
                f"group_size={self.group_size} is larger than the layer's in_features K={in_features}; "
                f"use group_size=-1 for one group per row, or a group size <= {in_features}"
            )
