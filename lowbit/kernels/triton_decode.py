"""Triton kernels for the one-token decode step: RMSNorm, RoPE + KV-cache write + attention, SiLU·mul.

Each replaces a handful of small PyTorch kernels by one launch; at batch 1 the step is a chain
of 5 (W4) to 8 (float) launches per layer, so their count, not their arithmetic, is what they save.
Shapes as in `decode_ops`, which chooses between these and the PyTorch versions.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_w4a16 import pdl_enabled


@triton.jit
def _pdl_start(PDL: tl.constexpr):
    """Under programmatic dependent launch (`triton_w4a16.pdl_enabled`): wait for the previous
    kernel's output, then let the next kernel be launched while this small one runs."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def _pdl(t: torch.Tensor) -> dict:
    on = pdl_enabled(t.device)
    return {"PDL": on, **({"launch_pdl": True} if on else {})}


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, H, eps, BLOCK: tl.constexpr, PDL: tl.constexpr):
    _pdl_start(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    m = offs < H
    x = tl.load(x_ptr + row * H + offs, mask=m, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, 0) / H + eps)
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    y = (x * r).to(y_ptr.dtype.element_ty).to(tl.float32) * w  # HF order: round, then scale by w
    tl.store(y_ptr + row * H + offs, y.to(y_ptr.dtype.element_ty), mask=m)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    H = x.shape[-1]
    y = torch.empty_like(x)
    block = triton.next_power_of_2(H)
    _rms_norm_kernel[(x.numel() // H,)](x, w, y, H, eps, BLOCK=block, num_warps=8 if block >= 2048 else 4, **_pdl(x))
    return y


@triton.jit
def _rope_attention_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, k_ptr, v_ptr, o_ptr, L, scale, HQ, HKV, GROUP,
                           D: tl.constexpr, HALF_P: tl.constexpr, BL: tl.constexpr, PDL: tl.constexpr):
    """RoPE of q and k at pos, k and v written into the caches there, and softmax attention of q over
    positions 0..pos (grouped-query heads), in one launch. Each q head's program rotates its
    q and its kv head's new k itself (the group's first program writes k and v into the caches),
    attends over the positions before pos from the cache and over pos from registers, so no
    program reads a cache row another is writing."""
    _pdl_start(PDL)
    h = tl.program_id(0)
    kh = h // GROUP
    pos = tl.load(pos_ptr)
    HALF: tl.constexpr = D // 2
    offs = tl.arange(0, HALF_P)
    dm = offs < HALF
    c = tl.load(cos_ptr + pos * HALF + offs, mask=dm, other=0.0)
    s = tl.load(sin_ptr + pos * HALF + offs, mask=dm, other=0.0)
    DT = o_ptr.dtype.element_ty
    qs, ks, vs = qkv_ptr + h * D, qkv_ptr + (HQ + kh) * D, qkv_ptr + (HQ + HKV + kh) * D
    x1 = tl.load(qs + offs, mask=dm, other=0.0).to(tl.float32)
    x2 = tl.load(qs + HALF + offs, mask=dm, other=0.0).to(tl.float32)
    q1 = (x1 * c - x2 * s).to(DT).to(tl.float32) * scale  # rounded as the separate kernels store q
    q2 = (x2 * c + x1 * s).to(DT).to(tl.float32) * scale
    x1 = tl.load(ks + offs, mask=dm, other=0.0).to(tl.float32)
    x2 = tl.load(ks + HALF + offs, mask=dm, other=0.0).to(tl.float32)
    k1 = (x1 * c - x2 * s).to(DT)
    k2 = (x2 * c + x1 * s).to(DT)
    v1 = tl.load(vs + offs, mask=dm, other=0.0)
    v2 = tl.load(vs + HALF + offs, mask=dm, other=0.0)
    k_base = k_ptr + kh * L * D
    v_base = v_ptr + kh * L * D
    if h % GROUP == 0:
        tl.store(k_base + pos * D + offs, k1, mask=dm)
        tl.store(k_base + pos * D + HALF + offs, k2, mask=dm)
        tl.store(v_base + pos * D + offs, v1, mask=dm)
        tl.store(v_base + pos * D + HALF + offs, v2, mask=dm)
    # position pos first: it starts the online softmax with a finite maximum
    m_i = tl.sum(k1.to(tl.float32) * q1, 0) + tl.sum(k2.to(tl.float32) * q2, 0)
    l_i = tl.zeros([], dtype=tl.float32) + 1.0
    a1, a2 = v1.to(tl.float32), v2.to(tl.float32)
    for start in range(0, pos, BL):
        offs_l = start + tl.arange(0, BL)
        lm = offs_l < pos
        t1 = offs_l[:, None] * D + offs[None, :]
        msk = lm[:, None] & dm[None, :]
        kt1 = tl.load(k_base + t1, mask=msk, other=0.0).to(tl.float32)
        kt2 = tl.load(k_base + t1 + HALF, mask=msk, other=0.0).to(tl.float32)
        sc = tl.where(lm, tl.sum(kt1 * q1[None, :], axis=1) + tl.sum(kt2 * q2[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(sc - m_new)
        vt1 = tl.load(v_base + t1, mask=msk, other=0.0).to(tl.float32)
        vt2 = tl.load(v_base + t1 + HALF, mask=msk, other=0.0).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        a1 = a1 * alpha + tl.sum(p[:, None] * vt1, axis=0)
        a2 = a2 * alpha + tl.sum(p[:, None] * vt2, axis=0)
        m_i = m_new
    tl.store(o_ptr + h * D + offs, (a1 / l_i).to(DT), mask=dm)
    tl.store(o_ptr + h * D + HALF + offs, (a2 / l_i).to(DT), mask=dm)


def rope_attention(qkv, cos, sin, pos, k_cache, v_cache, hq: int, hkv: int, scale: float) -> torch.Tensor:
    L, D = k_cache.shape[1], k_cache.shape[2]
    o = torch.empty(1, hq * D, dtype=qkv.dtype, device=qkv.device)
    _rope_attention_kernel[(hq,)](qkv, cos, sin, pos, k_cache, v_cache, o, L, scale, hq, hkv, hq // hkv, D=D,
                                  HALF_P=triton.next_power_of_2(D // 2), BL=64, num_warps=4, **_pdl(qkv))
    return o


@triton.jit
def _silu_mul_kernel(gu_ptr, o_ptr, I, BLOCK: tl.constexpr, PDL: tl.constexpr):
    _pdl_start(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < I
    g = tl.load(gu_ptr + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + I + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(o_ptr + offs, (g / (1.0 + tl.exp(-g)) * u).to(o_ptr.dtype.element_ty), mask=m)


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    I = gu.shape[-1] // 2
    o = torch.empty(1, I, dtype=gu.dtype, device=gu.device)
    _silu_mul_kernel[(triton.cdiv(I, 1024),)](gu, o, I, BLOCK=1024, num_warps=4, **_pdl(gu))
    return o


@triton.jit
def _argmax_part_kernel(x_ptr, val_ptr, idx_ptr, V, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Maximum of one BLOCK of the row and the first index holding it."""
    _pdl_start(PDL)
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("inf"), x)  # NaN wins, as in torch.argmax
    tl.store(val_ptr + pid, tl.max(x, 0))
    tl.store(idx_ptr + pid, pid * BLOCK + tl.argmax(x, 0, tie_break_left=True))


@triton.jit
def _argmax_next_kernel(val_ptr, idx_ptr, P, tok_ptr, tokens_ptr, pos_ptr, PB: tl.constexpr, PDL: tl.constexpr):
    """The blocks' first maximum -> tok and tokens[pos + 1]; pos += 1."""
    _pdl_start(PDL)
    offs = tl.arange(0, PB)
    v = tl.load(val_ptr + offs, mask=offs < P, other=float("-inf"))
    idx = tl.load(idx_ptr + tl.argmax(v, 0, tie_break_left=True))
    pos = tl.load(pos_ptr)
    tl.store(tok_ptr, idx)
    tl.store(tokens_ptr + pos + 1, idx)
    tl.store(pos_ptr, pos + 1)


def next_token_(logits: torch.Tensor, tok: torch.Tensor, tokens: torch.Tensor, pos: torch.Tensor) -> None:
    V = logits.shape[-1]
    block = 2048
    P = triton.cdiv(V, block)
    val = torch.empty(P, dtype=torch.float32, device=logits.device)
    idx = torch.empty(P, dtype=torch.int64, device=logits.device)
    _argmax_part_kernel[(P,)](logits, val, idx, V, BLOCK=block, num_warps=8, **_pdl(logits))
    _argmax_next_kernel[(1,)](val, idx, P, tok, tokens, pos, PB=triton.next_power_of_2(P), num_warps=4,
                              **_pdl(logits))
