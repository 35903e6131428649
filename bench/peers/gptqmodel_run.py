"""GPTQModel's GPTQ W{bits} g{group} on lowbit's calibration ids (its defaults otherwise).

    PEER_PYTHON bench/peers/gptqmodel_run.py --model M --calib ids.pt --out O [--desc-act 0|1]

The saved GPTQ checkpoint is decoded from its documented layout (qweight int32 [in/8, out] with
input-dim nibbles low bits first, qzeros int32 [groups, out/8], fp16 scales [groups, out], g_idx
[in]; v1 stores the packed zeros minus 0x11111111, undone as GPTQModel's loader does) into W_r [out, in].
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from _peer import Timer, calibration_ids, package_version, parse_args, save_dequantized


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [r, c] with 32/bits values per word along dim 0 -> [r·32/bits, c]."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    vals = (packed.unsqueeze(1) >> shifts[None, :, None]) & ((1 << bits) - 1)
    return vals.reshape(-1, packed.shape[1])


def v1_zeros_to_v2(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQModel writes v1 zeros as the packed v2 word minus 0x11111111 (integer arithmetic, so a zero
    point of 0 borrows from its neighbour) and its loader adds the word back: undo it the same way,
    exactly. A nibble-wise "+1" decode (exllama-style kernels) gets such groups wrong."""
    ones = sum(1 << (bits * i) for i in range(32 // bits))
    return (qzeros.to(torch.int64) + ones) & 0xFFFFFFFF  # words as int64 in [0, 2^32): unpack_rows reads them as is


def dequantize_gptq(t: dict[str, torch.Tensor], prefix: str, bits: int, v1: bool) -> tuple[torch.Tensor, int]:
    """W_r [out, in] and how many group zero points a nibble-wise v1 decode would get wrong."""
    q = unpack_rows(t[prefix + "qweight"], bits)                       # [in, out]
    qz = t[prefix + "qzeros"]
    z = unpack_rows((v1_zeros_to_v2(qz, bits) if v1 else qz).T.contiguous(), bits).T  # [groups, out]
    wrong = int((unpack_rows(qz.T.contiguous(), bits).T + 1 != z).sum()) if v1 else 0
    s = t[prefix + "scales"].float()                                   # [groups, out]
    g = t[prefix + "g_idx"].long()                                     # [in]
    return ((q - z[g]).float() * s[g]).T.contiguous(), wrong           # [out, in]


def main() -> None:
    args = parse_args(**{"--desc-act": 0, "--batch-size": 8})
    # its default CPU pool, (cores + 1) // 2 workers, is 1 on a 2-core machine, below the 2 its model
    # loader pool asks for (GPTQModel 7.7.0 then refuses Qwen2.5-0.5B); every core, as on larger machines
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
    from gptqmodel import GPTQModel, QuantizeConfig
    from safetensors.torch import load_file

    ids = calibration_ids(args.calib)
    data = [{"input_ids": r.tolist(), "attention_mask": [1] * ids.shape[1]} for r in ids]
    qc = QuantizeConfig(bits=args.bits, group_size=args.group_size, sym=args.sym, desc_act=bool(args.desc_act))
    model = GPTQModel.load(str(args.model), qc)
    with Timer() as t:
        model.quantize(data, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        model.save(tmp)
        cfg_file = next(p for p in (Path(tmp) / "quantize_config.json", Path(tmp) / "config.json") if p.is_file())
        cfg = json.loads(cfg_file.read_text())
        cfg = cfg.get("quantization_config", cfg)
        v1 = cfg.get("checkpoint_format", "gptq") == "gptq"
        tensors: dict[str, torch.Tensor] = {}
        for f in Path(tmp).glob("*.safetensors"):
            tensors.update(load_file(f))
    decoded = {p[:-len("qweight")] + "weight": dequantize_gptq(tensors, p[:-len("qweight")], args.bits, v1)
               for p in tensors if p.endswith(".qweight")}
    W_r = {k: w for k, (w, _) in decoded.items()}
    save_dequantized(args.model, args.out, W_r,
                     {"peer": "GPTQModel", "version": package_version("gptqmodel"), "quantize_config": cfg,
                      "quantize_s": t.s, "n_quantized": len(W_r),
                      "v1_zeros_a_nibble_wise_decode_gets_wrong": sum(n for _, n in decoded.values())})


if __name__ == "__main__":
    main()
