"""Triton kernels for the one-token decode step: RMSNorm, RoPE + KV-cache write, attention, SiLU·mul.

Each replaces a handful of small PyTorch kernels by one launch; at batch 1 the step is a chain
of ~10 launches per layer, so their count, not their arithmetic, is what they save.
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
def _rope_kv_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_ptr, v_ptr, L, HQ, HKV,
                    D: tl.constexpr, HALF_P: tl.constexpr, PDL: tl.constexpr):
    _pdl_start(PDL)
    h = tl.program_id(0)  # q heads, then k heads (each also copies its v head)
    pos = tl.load(pos_ptr)
    HALF: tl.constexpr = D // 2
    offs = tl.arange(0, HALF_P)
    m = offs < HALF
    c = tl.load(cos_ptr + pos * HALF + offs, mask=m, other=0.0)
    s = tl.load(sin_ptr + pos * HALF + offs, mask=m, other=0.0)
    src = qkv_ptr + h * D
    x1 = tl.load(src + offs, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + offs, mask=m, other=0.0).to(tl.float32)
    o1 = x1 * c - x2 * s
    o2 = x2 * c + x1 * s
    if h < HQ:
        dst = q_ptr + h * D
    else:
        kh = h - HQ
        dst = k_ptr + (kh * L + pos) * D
        vsrc = qkv_ptr + (HQ + HKV + kh) * D
        vdst = v_ptr + (kh * L + pos) * D
        tl.store(vdst + offs, tl.load(vsrc + offs, mask=m), mask=m)
        tl.store(vdst + HALF + offs, tl.load(vsrc + HALF + offs, mask=m), mask=m)
    tl.store(dst + offs, o1.to(q_ptr.dtype.element_ty), mask=m)
    tl.store(dst + HALF + offs, o2.to(q_ptr.dtype.element_ty), mask=m)


def rope_kv(qkv, cos, sin, pos, k_cache, v_cache, hq: int, hkv: int) -> torch.Tensor:
    L, D = k_cache.shape[1], k_cache.shape[2]
    q = torch.empty(hq, D, dtype=qkv.dtype, device=qkv.device)
    _rope_kv_kernel[(hq + hkv,)](qkv, cos, sin, pos, q, k_cache, v_cache, L, hq, hkv, D=D,
                                 HALF_P=triton.next_power_of_2(D // 2), num_warps=1, **_pdl(qkv))
    return q


@triton.jit
def _attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, pos_ptr, L, scale, GROUP,
                      D: tl.constexpr, DP: tl.constexpr, BL: tl.constexpr, PDL: tl.constexpr):
    _pdl_start(PDL)
    h = tl.program_id(0)  # one q head; its kv head is h // GROUP
    kh = h // GROUP
    pos = tl.load(pos_ptr)
    offs_d = tl.arange(0, DP)
    dm = offs_d < D
    q = tl.load(q_ptr + h * D + offs_d, mask=dm, other=0.0).to(tl.float32) * scale
    m_i = tl.zeros([], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([DP], dtype=tl.float32)
    k_base = k_ptr + kh * L * D
    v_base = v_ptr + kh * L * D
    for start in range(0, pos + 1, BL):
        offs_l = start + tl.arange(0, BL)
        lm = offs_l <= pos
        tile = offs_l[:, None] * D + offs_d[None, :]
        k = tl.load(k_base + tile, mask=lm[:, None] & dm[None, :], other=0.0).to(tl.float32)
        s = tl.where(lm, tl.sum(k * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)
        v = tl.load(v_base + tile, mask=lm[:, None] & dm[None, :], other=0.0).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    tl.store(o_ptr + h * D + offs_d, (acc / l_i).to(o_ptr.dtype.element_ty), mask=dm)


def attention(q, k_cache, v_cache, pos, scale: float) -> torch.Tensor:
    hq, D = q.shape
    hkv, L = k_cache.shape[0], k_cache.shape[1]
    o = torch.empty(1, hq * D, dtype=q.dtype, device=q.device)
    _attention_kernel[(hq,)](q, k_cache, v_cache, o, pos, L, scale, hq // hkv, D=D,
                             DP=triton.next_power_of_2(D), BL=64, num_warps=4, **_pdl(q))
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
