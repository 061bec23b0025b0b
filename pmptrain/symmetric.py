"""Symmetric products ``RᵀR`` by block-triangular matrix products (torch only).

E-MSA's statistics are symmetric products of rows: the state statistic ``XᵀX`` of a layer's input
rows (the im2col patches of a convolution), the costate statistic ``GᵀG``, the Gram matrix ``AAᵀ``
of the Gram route (docs/algorithms.md, "Closed-form maximisers"). A general matrix product forms both
triangles; BLAS's ``syrk`` forms one, but torch exposes none (``x.T @ x`` is an ordinary GEMM, as fast
as ``x.T @ y``). :func:`sym_gram` forms the upper triangle by GEMMs over ``b`` column blocks, only
the ``b(b+1)/2`` blocks on and above the diagonal — ``(b+1)/(2b)`` of the flops — and mirrors it.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch
from torch import Tensor

__all__ = ["sym_gram", "sym_block_width", "plain_products"]

# Measured on a 1-thread CPU (MKL, AVX-512; docs/performance.md, "The exact step's floor, continued"):
# blocks of about 64 columns gave 0.65–0.9 of the full product's time for widths 128–4608 once the
# product has ≥ 2²⁵ multiply-adds (≈ 0.3 ms); below that (the MLP's 128×128 Gram matrices over 784
# or 256 columns: 0.26 / 0.09 ms) the extra dispatches ate the saving, and narrower blocks lose
# GEMM efficiency.
_MIN_WIDTH = 128  # no blocking below this many columns
_MIN_WORK = 1 << 25  # … nor below this many multiply-adds (rows · width²)
_TARGET_BLOCK = 64  # columns per block (rounded up to a multiple of 16, equal blocks)
_MAX_BLOCKS = 16  # wider products get wider blocks (fewer, larger GEMMs)
_blocking = True  # False inside plain_products()


@contextlib.contextmanager
def plain_products() -> Iterator[None]:
    """Inside the block every :func:`sym_gram` without an explicit ``block`` is the plain product
    ``RᵀR`` (one GEMM, both triangles): the product before the block-triangular one, which the
    benchmarks time against (``benchmarks/step_time.py``'s ``*-plain-gram`` entries) and the tests
    compare with. Not thread-safe (a module flag)."""
    global _blocking
    old, _blocking = _blocking, False
    try:
        yield
    finally:
        _blocking = old


def sym_block_width(width: int, rows: int) -> int:
    """The column-block width :func:`sym_gram` uses for an ``rows × width`` operand; ``width`` itself
    (one block: the plain product) where blocking does not pay on the measured CPU."""
    if not _blocking or width < _MIN_WIDTH or rows * width * width < _MIN_WORK:
        return width
    blocks = min(_MAX_BLOCKS, max(2, round(width / _TARGET_BLOCK)))
    return min(width, 16 * math.ceil(math.ceil(width / blocks) / 16))


def sym_gram(rows: Tensor, out: Optional[Tensor] = None, alpha: float = 1.0, beta: float = 1.0,
             block: Optional[int] = None) -> Tensor:
    r"""The symmetric product

    .. math:: C = β\,C_{\text{out}} + α\,RᵀR

    of ``rows`` = R (N×k, any strides: a transposed view gives ``AAᵀ`` for ``A = rows.T``) with
    ``out`` = C_out (k×k, default None: ``C = αRᵀR``, β ignored), ``alpha`` = α (default 1) and
    ``beta`` = β (default 1). ``out`` is updated in place and returned; only its upper triangle is
    read (it must be symmetric, as an accumulator of such products is).

    The columns are split into ``b = ⌈k / block⌉`` blocks ``R = [R_1 … R_b]``; the blocks
    ``C_ij = β C_ij + α R_iᵀR_j`` for ``j ≥ i`` are formed by ``b`` GEMMs (one per block row, with
    ``R_i`` against ``[R_i … R_b]``), ``(b+1)/(2b)`` of the full product's flops, and the strictly
    lower triangle is the mirror of the strictly upper one, so a blocked result is exactly
    symmetric. The same numbers as ``β C_out + α RᵀR`` up to rounding (each entry is the same
    dot product; tested in float64).

    ``block`` (default None) is the block width in columns; None chooses it from the shape
    (:func:`sym_block_width`: one block — the plain product, as the GEMM leaves it — for narrow
    products, where blocking measured no gain).
    """
    if rows.dim() != 2:
        raise ValueError(f"sym_gram: rows must be a matrix (N×k), got shape {tuple(rows.shape)}")
    n, k = rows.shape
    if out is not None and tuple(out.shape) != (k, k):
        raise ValueError(f"sym_gram: out must be {k}×{k} for rows of width {k}, got {tuple(out.shape)}")
    width = sym_block_width(k, n) if block is None else int(block)
    if width <= 0:
        raise ValueError(f"sym_gram: block must be a positive number of columns, got {block}")
    if width >= k:  # one block: the plain product
        if out is None:
            prod = rows.T @ rows
            return prod if alpha == 1.0 else prod.mul_(alpha)
        return out.addmm_(rows.T, rows, beta=beta, alpha=alpha)
    if out is None:
        out, beta = torch.empty(k, k, dtype=rows.dtype, device=rows.device), 0.0
    for a0 in range(0, k, width):
        a1 = min(k, a0 + width)
        # β = 0 overwrites (the uninitialised memory of a fresh ``out`` is never read)
        out[a0:a1, a0:].addmm_(rows[:, a0:a1].T, rows[:, a0:], beta=beta, alpha=alpha)
        # mirrored block by block while it is in cache (one transposed copy of the whole matrix
        # measured 6× slower at k = 4608): the strip below the diagonal block, then the block itself
        if a1 < k:
            out[a1:, a0:a1].copy_(out[a0:a1, a1:].T)
        diag = out[a0:a1, a0:a1]
        upper = diag.triu(1)
        diag.triu_().add_(upper.T)
    return out
