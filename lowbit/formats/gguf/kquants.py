"""GGUF K-quants: 256-weight super-blocks whose sub-block scales (and mins) are themselves
quantized to 4 or 6 bits against one fp16 d (and dmin) per super-block.

  type  sub  codes   block bytes                                  grid per sub-block j
  Q2_K  16   0..3    scales[16] | qs[64] | d | dmin               W_r = W_q·(d·sc_j) − dmin·m_j   (sc, m 4-bit)
  Q3_K  16   0..7    hmask[32] | qs[64] | scales[12] | d          W_r = (W_q − 4)·(d·sc_j)        (sc 6-bit signed)
  Q4_K  32   0..15   d | dmin | scales[12] | qs[128]              W_r = W_q·(d·sc_j) − dmin·m_j   (sc, m 6-bit)
  Q5_K  32   0..31   d | dmin | scales[12] | qh[32] | qs[128]     W_r = W_q·(d·sc_j) − dmin·m_j   (sc, m 6-bit)
  Q6_K  16   0..63   ql[128] | qh[64] | scales[16] | d            W_r = (W_q − 32)·(d·sc_j)       (sc int8)

QParams hold the *effective* per-sub-block values: scale = d·sc_j, and zero = dmin·m_j (an offset
in weight units) for Q2/Q4/Q5_K or the code offset 4 / 32 for Q3_K / Q6_K. Both products are
exact in float32, so `pack` recovers d and sc_j (trying llama.cpp's choice, the largest sub-scale
at 63 / 15 / −32 / −128, first) and writes the very bytes llama.cpp writes.

`encode` is quantize_row_q*_K_ref (quantize_row_q*_K_impl with an importance vector), vectorised
over all super-blocks of a tensor: same float32 operations in the same order. Because the
sub-scales of a super-block are coupled through d, `fit` needs whole rows (a multiple of 256);
GPTQ must use static groups with these formats.
"""
from __future__ import annotations

import torch

from ...errors import LowbitError
from .base import GGUFFormat, check_codes, fp16, fp16_bytes, fp16_from_bytes
from .search import (_const, first_absmax, make_q3_quants, make_qkx2_quants, make_qkx3_quants, make_qp_quants,
                     make_qx_quants, nearest_int, rowsum, sqrtf)
from .table import QK_K


def split_scales(eff: torch.Tensor, lo: int, hi: int, first: int, zero_q: int = 0,
                 what: str = "scale") -> tuple[torch.Tensor, torch.Tensor]:
    """eff [NB, n] = d·q_j with d fp16 and integers q_j in [lo, hi] -> (d [NB], q [NB, n] int64).

    The sub-block with the largest |eff| is tried with q = `first` (llama.cpp's reference always
    puts it there), then with every other q by decreasing |q|, negative first as llama.cpp's
    searches put the largest sub-scale at a negative code; the first exact decomposition wins.
    Only the importance-weighted encoders, whose largest sub-scale need not sit at `first`, can
    leave a choice (ties in |q|); every choice decodes to the same values.
    All-zero super-blocks get d = 0 and q = zero_q (what llama.cpp stores for them).
    """
    NB, n = eff.shape
    d = torch.zeros(NB)
    q = torch.full((NB, n), zero_q, dtype=torch.int64)
    amax, emax = first_absmax(eff)
    todo = amax > 0
    ks = [first] + sorted((k for k in range(lo, hi + 1) if k not in (0, first)), key=lambda k: (-abs(k), k))
    for k in ks:
        if not todo.any():
            break
        idx = todo.nonzero().squeeze(1)
        e, em = eff[idx], emax[idx]
        dk = fp16(em / k)
        qk = torch.round(e / dk[:, None])
        ok = ((dk != 0) & (dk * k == em) & (dk[:, None] * qk == e).all(1)
              & (qk >= lo).all(1) & (qk <= hi).all(1))
        hit = idx[ok]
        d[hit] = dk[ok]
        q[hit] = qk[ok].to(torch.int64)
        todo[hit] = False
    if todo.any():
        raise LowbitError(f"K-quant {what}s of {int(todo.sum())} super-block(s) are not d·q with an fp16 d "
                          f"and integer q in [{lo}, {hi}]; they were not produced by this format's fit")
    return d, q


def _u8(t: torch.Tensor) -> torch.Tensor:
    """C's conversion of an int to uint8_t (modulo 256)."""
    return torch.remainder(t, 256)


def _pack_2bit(L: torch.Tensor) -> torch.Tensor:
    """[N, 256] 2-bit codes -> [N, 64]: byte 32h + l holds weights 128h + l + 32s at bits 2s."""
    L = L.to(torch.uint8).reshape(-1, 2, 4, 32)
    shifted = L << torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    return shifted.sum(2, dtype=torch.uint8).reshape(-1, 64)


def _unpack_2bit(b: torch.Tensor) -> torch.Tensor:
    b = b.reshape(-1, 2, 1, 32)
    return ((b >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)) & 3).reshape(-1, 256)


def _pack_q4k_nibbles(L: torch.Tensor) -> torch.Tensor:
    """[N, 256] 4-bit codes -> [N, 128]: byte 32c + l = weight 64c + l (low) | 64c + 32 + l (high)."""
    L = L.to(torch.uint8).reshape(-1, 4, 2, 32)
    return (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)


def _unpack_q4k_nibbles(b: torch.Tensor) -> torch.Tensor:
    b = b.reshape(-1, 4, 1, 32)
    return torch.cat([b & 0x0F, b >> 4], dim=2).reshape(-1, 256)


def _pack_k4_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins -> the 12 bytes of Q4_K/Q5_K (get_scale_min_k4's inverse)."""
    ls, lm = ls.to(torch.uint8), lm.to(torch.uint8)
    lo = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    mid = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    hi = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return torch.cat([lo, mid, hi], dim=1)


def _unpack_k4_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lo, mid, hi = b[:, :4], b[:, 4:8], b[:, 8:12]
    ls = torch.cat([lo & 63, (hi & 0x0F) | ((lo >> 6) << 4)], dim=1)
    lm = torch.cat([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], dim=1)
    return ls, lm


def _superblock_x2(G: torch.Tensor) -> torch.Tensor:
    """sum of x² over each super-block G [NB, 256], left to right -> [NB]."""
    return rowsum(G * G)


class _KQuant(GGUFFormat):
    """Shared reshaping: whole rows -> super-blocks [NB, 256] -> sub-blocks [NB·n_sub, sub]."""

    def search_grid(self):
        """The min-max integer grid of one sub-block (same bits, group length and symmetry): the
        K-quant searches cost about 20 encodes each, too slow to run inside AWQ's searches."""
        from ..int import IntFormat
        return IntFormat(bits=self.bits, group_size=self.group_size, sym=self.sym)

    def _split(self, W, qw):
        sub = self.group_size
        G = W.reshape(-1, QK_K)
        x = G.reshape(-1, sub)
        Q = None if qw is None else qw.reshape(-1, QK_K)
        return G, x, Q

    def _finish(self, W, codes, scale, zero):
        out = W.shape[0]
        return codes.to(torch.uint8).reshape(W.shape), scale.reshape(out, -1), zero.reshape(out, -1)


class _AffineK(_KQuant):
    """Q2_K / Q4_K / Q5_K: codes 0..nmax, W_r = W_q·scale − zero."""

    sym = False
    nmax: int

    def quantize_elementwise(self, W, scale, zero):
        q = nearest_int((W + zero) / scale).clamp(0, self.nmax)
        return torch.where(scale != 0, q, 0.0).to(torch.uint8)

    def dequantize_elementwise(self, W_q, scale, zero):
        return W_q.float() * scale - zero

    def _requantize(self, x, L, eff_scale, eff_min):
        """llama.cpp's final pass: codes against the stored sub-scales; a zero sub-scale keeps the
        codes of the search (`if (!d) continue;`)."""
        s, m = eff_scale.reshape(-1, 1), eff_min.reshape(-1, 1)
        q = nearest_int((x + m) / s).clamp(0, self.nmax)
        return torch.where(s != 0, q, L)


class _SymK(_KQuant):
    """Q3_K / Q6_K: codes 0..2·off−1, W_r = (W_q − off)·scale, signed sub-scales."""

    sym = True
    off: int

    def quantize_elementwise(self, W, scale, zero):
        q = nearest_int(W / scale).clamp(-self.off, self.off - 1) + self.off
        return torch.where(scale != 0, q, float(self.off)).to(torch.uint8)

    def dequantize_elementwise(self, W_q, scale, zero):
        return (W_q.float() - zero) * scale

    def _requantize(self, x, L, eff_scale):
        s = eff_scale.reshape(-1, 1)
        q = nearest_int(x / s).clamp(-self.off, self.off - 1) + self.off
        return torch.where(s != 0, q, L)


class _Q45K(_AffineK):
    """Q4_K and Q5_K share everything but the code width and the search constants."""

    rmin: float
    nstep: int

    def _reference(self, W, qw):
        G, x, Q = self._split(W, qw)
        NB = G.shape[0]
        if Q is None:  # quantize_row_q{4,5}_K_ref
            av_x = sqrtf(rowsum(x * x) / 32)
            w = av_x[:, None] + x.abs()
            scales, mins, L = make_qkx2_quants(x, w, self.nmax, self.rmin, 0.1, self.nstep, False)
            scales, mins = scales.reshape(NB, 8), mins.reshape(NB, 8)
            max_scale = scales.amax(1).clamp(min=0)
            max_min = mins.amax(1).clamp(min=0)
            inv_scale = torch.where(max_scale > 0, _const(63) / max_scale, 0.0)
            inv_min = torch.where(max_min > 0, _const(63) / max_min, 0.0)
            ls = _u8(nearest_int(inv_scale[:, None] * scales)).clamp(max=63)
            lm = _u8(nearest_int(inv_min[:, None] * mins)).clamp(max=63)
            d, dmin = fp16(max_scale / 63), fp16(max_min / 63)
        else:  # quantize_row_q{4,5}_K_impl
            sigma2 = 2 * _superblock_x2(G) / QK_K
            w = (Q * sqrtf(sigma2[:, None] + G * G)).reshape(-1, 32)
            sw = rowsum(w).reshape(NB, 8)
            scales, mins, L = make_qkx3_quants(x, w, self.nmax, -0.9, 0.05, 36, False)
            d_block, ls = make_qp_quants(scales.reshape(NB, 8), 63, sw)
            m_block, lm = make_qp_quants(mins.reshape(NB, 8), 63, sw)
            ls, lm = ls.clamp(max=63), lm.clamp(max=63)
            d, dmin = fp16(d_block), fp16(m_block)
        eff_scale, eff_min = d[:, None] * ls, dmin[:, None] * lm
        codes = self._requantize(x, L, eff_scale, eff_min)
        return self._finish(W, codes, eff_scale, eff_min)

    def _scale_fields(self, scale, zero):
        d, ls = split_scales(scale, 0, 63, 63, what="scale")
        dmin, lm = split_scales(zero, 0, 63, 63, what="min")
        return fp16_bytes(d), fp16_bytes(dmin), _pack_k4_scales(ls, lm)

    def _scale_values(self, data):
        d = fp16_from_bytes(data[:, 0:2])
        dmin = fp16_from_bytes(data[:, 2:4])
        ls, lm = _unpack_k4_scales(data[:, 4:16])
        return d[:, None] * ls.float(), dmin[:, None] * lm.float()


class Q4_K(_Q45K, type_name="q4_k"):
    bits = 4
    nmax = 15
    rmin = -1.0
    nstep = 20

    def _to_blocks(self, W_q, scale, zero):
        q = check_codes(W_q, 0, 15, self.name)
        return torch.cat([*self._scale_fields(scale, zero), _pack_q4k_nibbles(q)], dim=1)

    def _from_blocks(self, data):
        scale, zero = self._scale_values(data)
        return _unpack_q4k_nibbles(data[:, 16:]), scale, zero


class Q5_K(_Q45K, type_name="q5_k"):
    bits = 5
    nmax = 31
    rmin = -0.5
    nstep = 15

    def _to_blocks(self, W_q, scale, zero):
        q = check_codes(W_q, 0, 31, self.name).to(torch.uint8)
        hb = (q >> 4).reshape(-1, 8, 32)  # qh[l] bit b = fifth bit of weight 32·b + l
        qh = (hb << torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)).sum(1, dtype=torch.uint8)
        return torch.cat([*self._scale_fields(scale, zero), qh, _pack_q4k_nibbles(q & 0x0F)], dim=1)

    def _from_blocks(self, data):
        scale, zero = self._scale_values(data)
        qh = data[:, 16:48].reshape(-1, 1, 32)
        hb = ((qh >> torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)) & 1).reshape(-1, 256)
        return _unpack_q4k_nibbles(data[:, 48:]) | (hb << 4), scale, zero


class Q2_K(_AffineK, type_name="q2_k"):
    bits = 2
    nmax = 3

    def _reference(self, W, qw):
        G, x, Q = self._split(W, qw)
        NB = G.shape[0]
        if Q is None:  # quantize_row_q2_K_ref
            scales, mins, L = make_qkx2_quants(x, x.abs(), 3, -0.5, 0.1, 15, True)
            scales, mins = scales.reshape(NB, 16), mins.reshape(NB, 16)
            max_scale = scales.amax(1).clamp(min=0)
            max_min = mins.amax(1).clamp(min=0)
            ls = torch.where(max_scale[:, None] > 0, nearest_int((_const(15) / max_scale)[:, None] * scales), 0.0)
            lm = torch.where(max_min[:, None] > 0, nearest_int((_const(15) / max_min)[:, None] * mins), 0.0)
            d = torch.where(max_scale > 0, fp16(max_scale / 15), 0.0)
            dmin = torch.where(max_min > 0, fp16(max_min / 15), 0.0)
        else:  # quantize_row_q2_K_impl
            sigma2 = _superblock_x2(G) / QK_K
            w = (Q * sqrtf(sigma2[:, None] + G * G)).reshape(-1, 16)
            sw = rowsum(w).reshape(NB, 16)
            scales, mins, L = make_qkx3_quants(x, w, 3, -0.9, 0.05, 36, False)
            dm, ls = make_qp_quants(scales.reshape(NB, 16), 15, sw)
            mm, lm = make_qp_quants(mins.reshape(NB, 16), 15, sw)
            d, dmin = fp16(dm), fp16(mm)
        byte = _u8(ls.to(torch.int64)) | _u8(lm.to(torch.int64) * 16)  # uint8 scales[j] = ls | lm << 4
        sc, m = (byte & 0x0F).float(), (byte >> 4).float()
        eff_scale, eff_min = d[:, None] * sc, dmin[:, None] * m
        codes = self._requantize(x, L, eff_scale, eff_min)
        return self._finish(W, codes, eff_scale, eff_min)

    def _to_blocks(self, W_q, scale, zero):
        q = check_codes(W_q, 0, 3, self.name)
        d, sc = split_scales(scale, 0, 15, 15, what="scale")
        dmin, m = split_scales(zero, 0, 15, 15, what="min")
        scales = (sc | (m << 4)).to(torch.uint8)
        return torch.cat([scales, _pack_2bit(q), fp16_bytes(d), fp16_bytes(dmin)], dim=1)

    def _from_blocks(self, data):
        b = data[:, :16]
        d = fp16_from_bytes(data[:, 80:82])
        dmin = fp16_from_bytes(data[:, 82:84])
        return (_unpack_2bit(data[:, 16:80]), d[:, None] * (b & 0x0F).float(),
                dmin[:, None] * (b >> 4).float())


class Q3_K(_SymK, type_name="q3_k"):
    bits = 3
    off = 4

    def _reference(self, W, qw):
        G, x, Q = self._split(W, qw)
        NB = G.shape[0]
        if Q is None:  # quantize_row_q3_K_ref
            scales, L = make_q3_quants(x, 4)
            scales = scales.reshape(NB, 16)
            _, max_scale = first_absmax(scales)
            iscale = _const(-32) / max_scale
            l = nearest_int(iscale[:, None] * scales).clamp(-32, 31) + 32
            nz = max_scale != 0
            stored = torch.where(nz[:, None], l, 0.0)
            d = torch.where(nz, fp16(1 / iscale), 0.0)
        else:  # quantize_row_q3_K_impl
            sigma2 = 2 * _superblock_x2(G) / QK_K
            w = (Q * sqrtf(sigma2[:, None] + G * G)).reshape(-1, 16)
            sw = rowsum(w).reshape(NB, 16)
            scales, L = make_qx_quants(x, 4, w)
            d_block, stored = make_qx_quants(scales.reshape(NB, 16), 32, sw)
            d = fp16(d_block)
        eff_scale = d[:, None] * (stored - 32)
        codes = self._requantize(x, L, eff_scale)
        return self._finish(W, codes, eff_scale, torch.full_like(eff_scale, 4.0))

    def _to_blocks(self, W_q, scale, zero):
        q = check_codes(W_q, 0, 7, self.name).to(torch.uint8)
        d, sc = split_scales(scale, -32, 31, -32, zero_q=-32, what="scale")
        l = (sc + 32).to(torch.uint8)                                       # 6-bit stored scales
        hb = (q >> 2).reshape(-1, 8, 32)                                    # hmask[m] bit b: weight 32·b + m
        hmask = (hb << torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)).sum(1, dtype=torch.uint8)
        low = (l[:, :8] & 0x0F) | ((l[:, 8:] & 0x0F) << 4)
        high = ((l >> 4).reshape(-1, 4, 4) << torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 4, 1))
        high = high.sum(1, dtype=torch.uint8)                              # byte 8 + j%4, bits 2·(j/4)
        return torch.cat([hmask, _pack_2bit(q & 3), low, high, fp16_bytes(d)], dim=1)

    def _from_blocks(self, data):
        hmask, qs, sb = data[:, :32], data[:, 32:96], data[:, 96:108]
        d = fp16_from_bytes(data[:, 108:110])
        low = torch.cat([sb[:, :8] & 0x0F, sb[:, :8] >> 4], dim=1)
        high = ((sb[:, 8:12].reshape(-1, 1, 4) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 4, 1)) & 3)
        l = low | (high.reshape(-1, 16) << 4)
        hb = ((hmask.reshape(-1, 1, 32) >> torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)) & 1).reshape(-1, 256)
        q = _unpack_2bit(qs) | (hb << 2)
        scale = d[:, None] * (l.float() - 32)
        return q, scale, torch.full_like(scale, 4.0)


class Q6_K(_SymK, type_name="q6_k"):
    bits = 6
    off = 32

    def _reference(self, W, qw):
        G, x, Q = self._split(W, qw)
        NB = G.shape[0]
        scales, L = make_qx_quants(x, 32, None if Q is None else Q.reshape(-1, 16))
        scales = scales.reshape(NB, 16)
        max_abs, max_scale = first_absmax(scales)
        empty = max_abs < 1e-15                                             # block written as zeros
        iscale = _const(-128) / max_scale
        d = torch.where(empty, 0.0, fp16(1 / iscale))
        sc = torch.where(empty[:, None], 0.0, nearest_int(iscale[:, None] * scales).clamp(max=127))
        eff_scale = d[:, None] * sc
        codes = self._requantize(x, L, eff_scale)
        codes = torch.where(empty.repeat_interleave(16)[:, None], 0.0, codes)
        return self._finish(W, codes, eff_scale, torch.full_like(eff_scale, 32.0))

    def _to_blocks(self, W_q, scale, zero):
        q = check_codes(W_q, 0, 63, self.name).to(torch.uint8).reshape(-1, 2, 4, 32)  # [N, half, quarter, l]
        d, sc = split_scales(scale, -128, 127, -128, what="scale")
        lo, hi = q & 0x0F, q >> 4
        ql = torch.cat([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], dim=2)
        qh = (hi << torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)).sum(2, dtype=torch.uint8)
        return torch.cat([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.to(torch.int8).view(torch.uint8),
                          fp16_bytes(d)], dim=1)

    def _from_blocks(self, data):
        ql = data[:, :128].reshape(-1, 2, 2, 32)                            # [N, half, ql half, l]
        qh = data[:, 128:192].reshape(-1, 2, 1, 32)
        sc = data[:, 192:208].contiguous().view(torch.int8).float()
        d = fp16_from_bytes(data[:, 208:210])
        lo = torch.stack([ql[:, :, 0] & 0x0F, ql[:, :, 1] & 0x0F, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], dim=2)
        hi = (qh >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)) & 3
        q = (lo | (hi << 4)).reshape(-1, 256)
        scale = d[:, None] * sc
        return q, scale, torch.full_like(scale, 32.0)
