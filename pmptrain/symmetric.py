"""Symmetric products ``RᵀR`` by block-triangular matrix products (torch only).

E-MSA's statistics are symmetric products of rows: the state statistic ``XᵀX`` of a layer's input
rows (the im2col patches of a convolution), the costate statistic ``GᵀG``, the Gram matrix ``AAᵀ``
of the Gram route (docs/algorithms.md §2, "Convolutions" for the patch statistic). A general matrix product forms both
triangles; BLAS's ``syrk`` forms one, but torch exposes none (``x.T @ x`` is an ordinary GEMM, as fast
as ``x.T @ y``). :func:`sym_gram` forms the upper triangle by GEMMs over ``b`` column blocks, only
the ``b(b+1)/2`` blocks on and above the diagonal — ``(b+1)/(2b)`` of the flops — and mirrors it.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["sym_gram", "sym_block_width", "plain_products", "conv2d_patch_gram", "shifted_gram_pays"]

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
    ``RᵀR`` (one GEMM, both triangles) and :func:`shifted_gram_pays` says no (the capture forms a
    convolution's im2col rows): the products before this module, which the benchmarks time against
    (``benchmarks/step_time.py``'s ``*-plain-gram`` entries) and the tests compare with. Not
    thread-safe (a module flag)."""
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
    if block is not None and int(block) <= 0:
        raise ValueError(f"sym_gram: block must be a positive number of columns, got {block}")
    width = sym_block_width(k, n) if block is None else int(block)
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


def shifted_gram_pays(out_hw: Tuple[int, int], kernel, channels: int, zero_rows: Tuple[int, int] = (0, 0)) -> bool:
    """Whether :func:`conv2d_patch_gram` is expected to beat :func:`sym_gram` of the im2col rows for a
    stride-1 convolution with ``out_hw`` output positions per image (``zero_rows`` as there). Cost in
    units of ``W_o·(k_w C)²`` multiply-adds: the shifted products cover ``k_h(H_p + k_h − 1)`` rows plus
    ``Σ_a (k_h − a)·(non-zero padded rows outside tap row a's window)`` correction rows; the im2col
    route ``f·k_h²·H_o`` (``f`` = :func:`sym_gram`'s flop fraction) plus ``0.1·k_h²·H_o`` for writing
    and reading the rows (fitted). Measured (1 thread, 3×3, zero padding 1; against im2col + one
    GEMM; shifted vs im2col + :func:`sym_gram`): 14×14×16 channels 0.51 vs 0.92, 16×16×128 0.38 vs
    0.73, 8×8×256 0.56 vs 0.63, 8×8×128 0.57 vs 0.71, 4×4×512 1.35 vs 0.68 (im2col wins); fewer than
    16 columns ``k_w C`` (the first convolution of an image model) gained nothing."""
    kh, kw = int(kernel[0]), int(kernel[1])
    ho, wo = out_hw
    if not _blocking or kh <= 1 or channels * kw < 16:  # one tap row / too narrow for GEMM efficiency
        return False
    hp = ho + kh - 1
    kept = range(zero_rows[0], hp - zero_rows[1])
    corrections = sum((kh - a) * sum(1 for h in kept if not a <= h < a + ho) for a in range(kh))
    shifted = kh * (hp + kh - 1) + corrections
    width = channels * kh * kw
    w = sym_block_width(width, ho * wo * 64)  # the fraction for a typical batch (only the width matters)
    blocks = -(-width // w)
    return shifted < ((blocks + 1) / (2 * blocks) + 0.1) * kh * kh * ho


def conv2d_patch_gram(xp: Tensor, kernel, zero_rows: Tuple[int, int] = (0, 0)) -> Tuple[Tensor, Tensor]:
    r"""``(PᵀP, Σ_p P_p)`` of the im2col rows ``P`` of a 2-D convolution with stride 1 and dilation 1,
    without forming ``P``: the statistic's shift structure (Toeplitz up to border rows).

    ``xp`` = the *padded* input ``[N, C, H_p, W_p]``, ``kernel`` = ``(k_h, k_w)``; ``P`` has one row
    per output position ``(n, i, j)`` (``H_o = H_p − k_h + 1`` × ``W_o = W_p − k_w + 1`` per image)
    and ``C·k_h·k_w`` columns in the weight's order ``(c, a, b)``: ``P[(n,i,j), (c,a,b)] =
    xp[n, c, i+a, j+b]``. ``zero_rows`` = ``(top, bottom)`` (default ``(0, 0)``): how many padded
    rows at the top and bottom of every image are known to be zero (the convolution's zero
    padding), whose border corrections vanish and are skipped. Returned in ``xp``'s dtype.

    Let ``T`` be the width-only im2col of every padded row: ``T[n, h, j] = (xp[n, :, h, j+b])_{b,c}``
    (``k_w·C`` columns), for ``h`` over the padded rows and ``k_h − 1`` extra zero rows per image,
    flattened to rows ``g = (n, h, j)``. Then the block of rows ``a``, ``a'`` (``s = a' − a ≥ 0``) of
    ``PᵀP`` is

    .. math:: \sum_{n,\,i<H_o,\,j} T_{n,i+a,j}\,T_{n,i+a+s,j}^⊤ = C_s − \sum_{n,\,h∉[a,a+H_o),\,j} T_{n,h,j}\,T_{n,h+s,j}^⊤,
       \qquad C_s = \sum_g T_g\,T_{g+sW_o}^⊤,

    exactly: the shifted rows never cross into the next image (the zero rows), and the
    correction runs over the ``k_h − 1`` padded rows outside the window of tap row ``a``. So ``PᵀP``
    costs ``k_h`` products ``(k_w C)²`` over ``N(H_p + k_h − 1)W_o`` rows (:func:`sym_gram` for
    ``s = 0``) plus the border corrections, instead of ``(k_h k_w C)²`` over ``N H_o W_o`` rows:
    ≈ ``k_h·(H_p + k_h − 1)/(k_h² H_o)`` of the flops (0.43 for 3×3 on 14×14), and ``T`` holds
    ``k_w`` copies of the input instead of ``k_h k_w``. ``Σ_p P_p`` comes from the same rows (column
    sums of ``T`` less the corrections' rows). The same numbers as ``P.T @ P`` and ``P.sum(0)`` up to
    rounding (tested in float64 against :func:`pmptrain.modules` ``_patch_rows``); the result is
    exactly symmetric.
    """
    if xp.dim() != 4 or len(kernel) != 2:
        raise ValueError(f"conv2d_patch_gram: a padded [N, C, H, W] input and a 2-D kernel, got shape "
                         f"{tuple(xp.shape)} and kernel {tuple(kernel)}")
    n, c, hp, wp = xp.shape
    kh, kw = int(kernel[0]), int(kernel[1])
    ho, wo = hp - kh + 1, wp - kw + 1
    if ho <= 0 or wo <= 0:
        raise ValueError(f"conv2d_patch_gram: a {kh}×{kw} kernel does not fit a {hp}×{wp} padded input")
    m, rows = kw * c, hp + kh - 1  # columns of T; T's rows per image (zero rows at the bottom)
    xl = xp.movedim(1, -1).contiguous()  # [N, H_p, W_p, C]: the copies below then read contiguous rows
    t = xp.new_empty(n, rows, wo, kw, c)
    t[:, hp:].zero_()
    for b in range(kw):
        t[:, :hp, :, b].copy_(xl[:, :, b:b + wo])
    t3 = t.view(n, rows, wo, m)
    tf = t.view(n * rows * wo, m)
    total = tf.shape[0]
    shifted = [sym_gram(tf)] + [tf[: total - s * wo].T @ tf[s * wo:] for s in range(1, kh)]  # C_s
    col_sum = tf.sum(0)
    out = xp.new_empty(kh, m, kh, m)
    sums = xp.new_empty(kh, m)
    for a in range(kh):
        # the padded rows outside tap row a's window, less the known zero rows (their terms vanish)
        outside = [h for h in range(zero_rows[0], hp - zero_rows[1]) if not a <= h < a + ho]
        left = t3[:, outside].reshape(-1, m) if outside else None
        sums[a] = col_sum if left is None else col_sum - left.sum(0)
        for s in range(kh - a):
            block = out[a, :, a + s]
            if left is None:
                block.copy_(shifted[s])
            else:
                right = t3[:, [h + s for h in outside]].reshape(-1, m)
                torch.sub(shifted[s], left.T @ right, out=block)
    # blocks below the diagonal: the transposes; then the weight's order (c, a, b)
    for a in range(kh):
        for a2 in range(a):
            out[a, :, a2].copy_(out[a2, :, a].T)
    g = out.view(kh, kw, c, kh, kw, c).permute(2, 0, 1, 5, 3, 4).reshape(c * kh * kw, c * kh * kw)
    upper = g.triu(1)
    return g.triu_().add_(upper.T), sums.view(kh, kw, c).permute(2, 0, 1).reshape(-1)
