"""GGUF's 32-weight blocks: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

  type  block bytes                       grid (d, m fp16)               codes
  Q4_0  d | qs[16]                        W_r = (W_q − 8)·d              0..15
  Q5_0  d | qh[4] | qs[16]                W_r = (W_q − 16)·d             0..31
  Q4_1  d | m | qs[16]                    W_r = W_q·d + m                0..15
  Q5_1  d | m | qh[4] | qs[16]            W_r = W_q·d + m                0..31
  Q8_0  d | qs[32] (int8)                 W_r = W_q·d                    −127..127

QParams: scale = d; zero = the code offset (8, 16, 0) for the symmetric types and −m (an offset in
weight units, W_r = W_q·scale − zero) for Q4_1/Q5_1. Nibble j of qs holds weight j (low) and
j + 16 (high); qh bit j is the fifth bit of weight j.

`encode` is llama.cpp's quantize_row_*_ref (the *_impl search when an importance vector is given),
byte-identical to `gguf.quants.quantize` (except the sign of a Q4_1/Q5_1 minimum that is a signed
zero, which numpy's reduction leaves unspecified): codes are rounded against the float32 d before
d is stored as fp16. The grid (`quantize_elementwise`) rounds against the stored d, the exact grid the
runtime decodes with, which is what GPTQ needs.
"""
from __future__ import annotations

import torch

from .base import GGUFFormat, check_codes, fp16, fp16_bytes, fp16_from_bytes
from .search import make_qkx3_quants, make_qx_quants, rowsum, sqrtf


def _inv(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _row_sigma2(W: torch.Tensor) -> torch.Tensor:
    """sum(x²)/n over each full row, summed left to right as the *_impl functions do -> [out, 1]."""
    return (rowsum(W * W) / W.shape[1]).unsqueeze(1)


def _imatrix_weights(W: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """qw · sqrt(σ² + x²), the per-weight importance of the legacy *_impl encoders."""
    return qw * sqrtf(_row_sigma2(W) + W * W)


def _first_min(G: torch.Tensor) -> torch.Tensor:
    """Row minimum as C's `if (v < min) min = v` finds it: the first of equal minima, which
    decides the sign of a zero minimum (stored as m). gguf-py's numpy reduction leaves that sign
    unspecified; the values are equal either way."""
    first = (G == G.amin(dim=1, keepdim=True)).to(torch.int8).argmax(dim=1, keepdim=True)
    return G.gather(1, first)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """[N, 32] codes -> [N, 16] bytes: weight j in the low nibble, j + 16 in the high one."""
    q = q.to(torch.uint8)
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def _from_nibbles(b: torch.Tensor) -> torch.Tensor:
    return torch.cat([b & 0x0F, b >> 4], dim=1)


def _qh(q: torch.Tensor) -> torch.Tensor:
    """[N, 32] 5-bit codes -> [N, 4] bytes of the little-endian uint32 of fifth bits."""
    bits = ((q.to(torch.uint8) >> 4) & 1).reshape(-1, 4, 8)
    return (bits << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)


def _from_qh(b: torch.Tensor) -> torch.Tensor:
    return ((b.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1, 32)


class _Symmetric(GGUFFormat):
    """Q4_0 / Q5_0: d = max/−offset with the sign of the absmax weight, codes 0..2·offset−1."""

    sym = True
    offset: int

    def _reference(self, W, qw):
        off = self.offset
        G = W.reshape(-1, 32)
        if qw is None:
            imax = G.abs().argmax(dim=1, keepdim=True)
            d = G.gather(1, imax) / -off                       # [N, 1] float32, before fp16
            q = torch.trunc(G * _inv(d) + (off + 0.5)).clamp(0, 2 * off - 1)
        else:
            wt = _imatrix_weights(W, qw).reshape(-1, 32)
            d, q = make_qx_quants(G, off, wt)
            d = d.unsqueeze(1)
        out = W.shape[0]
        return (q.to(torch.uint8).reshape(W.shape), fp16(d).reshape(out, -1),
                torch.full((out, W.shape[1] // 32), float(off)))

    def quantize_elementwise(self, W, scale, zero):
        off = self.offset
        return torch.trunc(W * _inv(scale) + (off + 0.5)).clamp(0, 2 * off - 1).to(torch.uint8)

    def dequantize_elementwise(self, W_q, scale, zero):
        return (W_q.float() - zero) * scale


class _Affine(GGUFFormat):
    """Q4_1 / Q5_1: d = (max − min)/nmax, m = min, codes 0..nmax."""

    sym = False
    nmax: int

    def _reference(self, W, qw):
        nmax = self.nmax
        G = W.reshape(-1, 32)
        if qw is None:
            mn, mx = _first_min(G), G.amax(dim=1, keepdim=True)
            d = (mx - mn) / nmax
            q = torch.trunc((G - mn) * _inv(d) + 0.5).clamp(0, nmax)
        else:
            wt = _imatrix_weights(W, qw).reshape(-1, 32)
            d, the_min, q = make_qkx3_quants(G, wt, nmax, -0.9, 0.05, 36)
            d, mn = d.unsqueeze(1), -the_min.unsqueeze(1)
        out = W.shape[0]
        return (q.to(torch.uint8).reshape(W.shape), fp16(d).reshape(out, -1), -fp16(mn).reshape(out, -1))

    def quantize_elementwise(self, W, scale, zero):
        return torch.trunc((W + zero) * _inv(scale) + 0.5).clamp(0, self.nmax).to(torch.uint8)

    def dequantize_elementwise(self, W_q, scale, zero):
        return W_q.float() * scale - zero


class Q4_0(_Symmetric, type_name="q4_0"):
    bits = 4
    offset = 8

    def _to_blocks(self, W_q, scale, zero):
        q = check_codes(W_q, 0, 15, self.name)
        return torch.cat([fp16_bytes(scale[:, 0]), _nibbles(q)], dim=1)

    def _from_blocks(self, data):
        d = fp16_from_bytes(data[:, :2]).unsqueeze(1)
        return _from_nibbles(data[:, 2:]), d, torch.full_like(d, 8.0)


class Q5_0(_Symmetric, type_name="q5_0"):
    bits = 5
    offset = 16

    def _to_blocks(self, W_q, scale, zero):
        q = check_codes(W_q, 0, 31, self.name)
        return torch.cat([fp16_bytes(scale[:, 0]), _qh(q), _nibbles(q)], dim=1)

    def _from_blocks(self, data):
        d = fp16_from_bytes(data[:, :2]).unsqueeze(1)
        q = _from_nibbles(data[:, 6:]) | (_from_qh(data[:, 2:6]) << 4)
        return q, d, torch.full_like(d, 16.0)


class Q4_1(_Affine, type_name="q4_1"):
    bits = 4
    nmax = 15

    def _to_blocks(self, W_q, scale, zero):
        q = check_codes(W_q, 0, 15, self.name)
        return torch.cat([fp16_bytes(scale[:, 0]), fp16_bytes(-zero[:, 0]), _nibbles(q)], dim=1)

    def _from_blocks(self, data):
        d = fp16_from_bytes(data[:, :2]).unsqueeze(1)
        m = fp16_from_bytes(data[:, 2:4]).unsqueeze(1)
        return _from_nibbles(data[:, 4:]), d, -m


class Q5_1(_Affine, type_name="q5_1"):
    bits = 5
    nmax = 31

    def _to_blocks(self, W_q, scale, zero):
        q = check_codes(W_q, 0, 31, self.name)
        return torch.cat([fp16_bytes(scale[:, 0]), fp16_bytes(-zero[:, 0]), _qh(q), _nibbles(q)], dim=1)

    def _from_blocks(self, data):
        d = fp16_from_bytes(data[:, :2]).unsqueeze(1)
        m = fp16_from_bytes(data[:, 2:4]).unsqueeze(1)
        q = _from_nibbles(data[:, 8:]) | (_from_qh(data[:, 4:8]) << 4)
        return q, d, -m


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C roundf: half away from zero (the formula gguf-py uses, exact in float32)."""
    a = x.abs()
    fl = torch.floor(a)
    return torch.sign(x) * (fl + torch.floor(2 * (a - fl)))


class Q8_0(GGUFFormat, type_name="q8_0"):
    """d = absmax/127, codes int8 −127..127 (W_q is int8, zero = 0)."""

    bits = 8
    sym = True

    def _reference(self, W, qw):  # llama.cpp ignores the importance vector for Q8_0
        G = W.reshape(-1, 32)
        d = G.abs().amax(dim=1, keepdim=True) / 127
        q = _roundf(G * _inv(d))
        out = W.shape[0]
        return q.to(torch.int8).reshape(W.shape), fp16(d).reshape(out, -1), torch.zeros(out, W.shape[1] // 32)

    def quantize_elementwise(self, W, scale, zero):
        return _roundf(W * _inv(scale)).clamp(-127, 127).to(torch.int8)

    def dequantize_elementwise(self, W_q, scale, zero):
        return (W_q.float() - zero) * scale

    def _to_blocks(self, W_q, scale, zero):
        q = check_codes(W_q, -128, 127, self.name)
        return torch.cat([fp16_bytes(scale[:, 0]), q.to(torch.int8).view(torch.uint8)], dim=1)

    def _from_blocks(self, data):
        d = fp16_from_bytes(data[:, :2]).unsqueeze(1)
        return data[:, 2:].contiguous().view(torch.int8), d, torch.zeros_like(d)
