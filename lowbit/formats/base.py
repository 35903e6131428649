"""The contract every weight format fulfils.

A format is a grid that algorithms (RTN, AWQ, GPTQ) quantize onto, plus the exact inverse.
Pure tensor math: no modules, no files.

Names: ``W`` float weights [out, in]; ``W_q`` integer codes [out, in]; ``W_r`` reconstruction.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..errors import LowbitError


@dataclass
class QParams:
    """Per-group grid parameters.

    Shapes: scale [out, n_groups]; zero [out, n_groups] (integer-valued, in code units).
    """

    scale: torch.Tensor
    zero: torch.Tensor

    def select(self, rows: slice | torch.Tensor) -> "QParams":
        return QParams(self.scale[rows], self.zero[rows])


@dataclass
class QuantizedTensor:
    """Codes plus the grid parameters that decode them (one linear's weight).

    g_idx: optional group of each input column, int [in] (GPTQ act-order); None means the
    contiguous groups the format defines (column j in group j // group_length).
    """

    W_q: torch.Tensor
    qparams: QParams
    format: "Format"
    g_idx: torch.Tensor | None = None

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.g_idx is None:
            W_r = self.format.dequantize(self.W_q, self.qparams)
        else:
            g = self.g_idx.long()
            W_r = self.format.dequantize_elementwise(self.W_q, self.qparams.scale.float()[:, g],
                                                     self.qparams.zero.float()[:, g])
        return W_r if dtype is None else W_r.to(dtype)


class Format(ABC):
    """A grouped weight grid. Subclasses set ``name`` and register in ``formats/__init__``."""

    name: str = ""
    group_size: int
    # whether `encode`/`fit` weigh weights by an importance vector (GGUF's imatrix); others ignore it
    uses_importance: bool = False

    def groups(self, in_features: int) -> int:
        """Number of groups along a row of `in_features`; refuses sizes that do not divide."""
        gs = self.group_length(in_features)
        if in_features % gs:
            raise LowbitError(
                f"group size {gs} does not divide in_features {in_features}; "
                f"use a --group-size that divides it (e.g. {_divisor_hint(in_features)}) or 0 for per-channel"
            )
        return in_features // gs

    def group_length(self, in_features: int) -> int:
        return in_features if self.group_size == 0 else self.group_size

    def grouped(self, W: torch.Tensor) -> torch.Tensor:
        """W [out, in] -> [out, n_groups, group_size]."""
        out, inp = W.shape
        return W.reshape(out, self.groups(inp), self.group_length(inp))

    @abstractmethod
    def fit(self, W: torch.Tensor, clip: torch.Tensor | float | None = None) -> QParams:
        """Grid parameters for W [out, in]; `clip` (scalar or [out, n_groups]) shrinks the range."""

    @abstractmethod
    def quantize_elementwise(self, W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Codes for W on the grid given by `scale`, `zero` (both broadcastable to W).

        This is the grid GPTQ rounds onto one column at a time, and AWQ/RTN a whole tensor at once.
        """

    @abstractmethod
    def dequantize_elementwise(self, W_q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Exact inverse of `quantize_elementwise` on the grid points (float32)."""

    # Both work on the [out, n_groups, group_len] view with the group parameters broadcast, not
    # expanded: for an 8B MLP weight each expanded copy would be another 235 MB.
    def quantize(self, W: torch.Tensor, qparams: QParams) -> torch.Tensor:
        """W [out, in] -> codes W_q [out, in] on the grid `qparams` describes."""
        codes = self.quantize_elementwise(self.grouped(W.float()), qparams.scale[..., None], qparams.zero[..., None])
        return codes.reshape(W.shape)

    def dequantize(self, W_q: torch.Tensor, qparams: QParams) -> torch.Tensor:
        """Codes W_q [out, in] -> W_r [out, in] (float32)."""
        W_r = self.dequantize_elementwise(self.grouped(W_q), qparams.scale.float()[..., None],
                                          qparams.zero.float()[..., None])
        return W_r.reshape(W_q.shape)

    @abstractmethod
    def bits_per_weight(self, in_features: int) -> float:
        """Storage cost per weight, metadata (scales, zeros) included."""

    def encode(self, W: torch.Tensor, clip: torch.Tensor | float | None = None,
               importance: torch.Tensor | None = None) -> QuantizedTensor:
        """Codes for W. `importance` [in] (E[x²] of W's input) is used by formats that set
        `uses_importance` and ignored by the others."""
        qp = self.fit(W, clip)
        return QuantizedTensor(self.quantize(W, qp), qp, self)

    def search_grid(self) -> "Format":
        """A fast stand-in with this grid's shape (bits, group length, symmetry) for searches that
        round a weight many times (AWQ's α and clipping); the format itself unless its encoder is slow."""
        return self

    def per_weight(self, qp: QParams, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Grid parameters repeated over their groups' columns: scale, zero [out, n_groups] -> [out, in] (float32)."""
        gl = self.group_length(in_features)
        return expand_groups(qp.scale.float(), gl), expand_groups(qp.zero.float(), gl)

    def neighbour_codes(self, W: torch.Tensor, W_q: torch.Tensor,
                        qp: QParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each weight's other neighbouring grid point: the grid point nearest W_r on the far side of W.

        It is looked for among the adjacent codes W_q ± 1, which holds for ordered code books (int,
        nf4) and for sign-magnitude ones (fp4, fp8), whose codes run away from zero on both sides.
        Shapes: W, W_q [out, in] -> codes [out, in], value change δ [out, in], valid [out, in] bool
        (False where no such code exists, e.g. a clipped weight at the range end).
        """
        scale, zero = self.per_weight(qp, W.shape[1])
        W_r = self.dequantize_elementwise(W_q, scale, zero)
        side = torch.where(W >= W_r, 1.0, -1.0)  # on the grid exactly: up, as DH-AWQ does
        info = torch.iinfo(W_q.dtype)  # codes stay in their dtype, and unsigned ones below 2^bits
        lo, hi = info.min, info.max if info.min < 0 else min(info.max, (1 << getattr(self, "bits", 8)) - 1)
        best_codes, best_delta = W_q, torch.full_like(W, math.inf)
        for step in (1, -1):
            wide = W_q.to(torch.int16) + step
            codes = wide.clamp(lo, hi).to(W_q.dtype)
            delta = self.dequantize_elementwise(codes, scale, zero) - W_r
            ok = (wide >= lo) & (wide <= hi) & (delta * side > 0)
            ok &= self.quantize_elementwise(W_r + delta, scale, zero).to(codes.dtype) == codes  # a grid code
            better = ok & (delta.abs() < best_delta.abs())
            best_codes = torch.where(better, codes, best_codes)
            best_delta = torch.where(better, delta, best_delta)
        valid = torch.isfinite(best_delta)
        return best_codes, torch.where(valid, best_delta, 0.0), valid

    # whether W_r scales with each row's stored scales (codes and zeros fixed): a factor per row can go into them
    row_scalable = False

    def rescale_rows(self, qt: QuantizedTensor, gain: torch.Tensor) -> QuantizedTensor | None:
        """`qt` with row r's reconstruction multiplied by gain[r] (gain [out]), through its stored scales;
        None where the scales cannot carry a factor per row (per-tensor or power-of-two scales)."""
        if not self.row_scalable:
            return None
        qp = qt.qparams
        return QuantizedTensor(qt.W_q, QParams(self.stored_scale(qp.scale.float() * gain[:, None]), qp.zero),
                               qt.format, qt.g_idx)

    def stored_scale(self, scale: torch.Tensor) -> torch.Tensor:
        """`scale` as the format stores it (rounded to its scale dtype)."""
        return scale

    def fake_quantize(self, W: torch.Tensor, clip: torch.Tensor | float | None = None) -> torch.Tensor:
        """W -> W_r: round-trip through the grid (what the deployed model will compute with)."""
        return self.encode(W, clip).dequantize()

    @classmethod
    def from_scheme(cls, scheme, scale_dtype: torch.dtype = torch.float32) -> "Format":
        """The format for a QuantScheme; formats whose layout fixes bits or group size override this."""
        return cls(bits=scheme.bits, group_size=scheme.group_size, sym=scheme.sym, scale_dtype=scale_dtype)

    def for_tensor(self, W: torch.Tensor) -> "Format":
        """This format with its per-tensor parameters (if it has any) fixed from the whole weight W.

        Algorithms that fit column slices of W one group at a time (GPTQ) call it once per weight,
        so that every slice shares e.g. NVFP4's global scale. Most formats return self.
        """
        return self

    def pack(self, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        """The storage tensors of `qt` (name -> tensor), the format's on-disk layout."""
        raise NotImplementedError(f"format {self.name!r} defines no packed layout")

    def unpack(self, tensors: dict[str, torch.Tensor]) -> QuantizedTensor:
        """Exact inverse of `pack`."""
        raise NotImplementedError(f"format {self.name!r} defines no packed layout")


def expand_groups(t: torch.Tensor, group_len: int) -> torch.Tensor:
    """[out, n_groups] -> [out, n_groups * group_len], each group value repeated over its columns."""
    return t.repeat_interleave(group_len, dim=1)


def _divisor_hint(n: int) -> str:
    cands = [g for g in (128, 64, 32, 16) if n % g == 0]
    return " or ".join(str(g) for g in cands[:2]) if cands else "0"
