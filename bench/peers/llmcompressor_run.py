"""llm-compressor (GPTQModifier or AWQModifier) W{bits} g{group} on lowbit's calibration ids.

    PEER_PYTHON bench/peers/llmcompressor_run.py --method gptq|awq --model M --calib ids.pt --out O
"""
from __future__ import annotations

import torch

from _peer import Timer, calibration_ids, package_version, parse_args, save_dequantized


def main() -> None:
    args = parse_args(**{"--method": "gptq"})
    # llm-compressor pins batches with pin_memory(), which needs a CUDA runtime; on a CPU-only
    # machine it is a no-op by definition.
    if not torch.cuda.is_available():
        torch.Tensor.pin_memory = lambda self, *a, **k: self
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.quantization import GPTQModifier
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from transformers import AutoModelForCausalLM

    ids = calibration_ids(args.calib)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    weights = {"num_bits": args.bits, "type": "int", "symmetric": args.sym, "strategy": "group",
               "group_size": args.group_size}
    groups = {"group_0": {"targets": ["Linear"], "weights": weights}}
    modifier = (GPTQModifier(config_groups=groups, ignore=["lm_head"]) if args.method == "gptq"
                else AWQModifier(config_groups=groups, ignore=["lm_head"]))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    with Timer() as t:
        oneshot(model=model, dataset=ds, recipe=modifier, num_calibration_samples=len(ids),
                max_seq_length=ids.shape[1])
    W_r = {}
    with torch.no_grad():
        for name, m in model.named_modules():
            if hasattr(m, "weight_scale") and hasattr(m, "quantization_scheme"):
                W_r[name + ".weight"] = fake_quantize(m.weight, m.weight_scale, m.weight_zero_point,
                                                      m.quantization_scheme.weights)
    # AWQ folds its scales into the norms: take every other parameter from the quantized model too.
    extra = {n: p.detach() for n, p in model.named_parameters() if "norm" in n}
    save_dequantized(args.model, args.out, {**W_r, **extra},
                     {"peer": "llm-compressor", "version": package_version("llmcompressor"), "method": args.method,
                      "modifier": repr(modifier)[:2000], "quantize_s": t.s, "n_quantized": len(W_r)})


if __name__ == "__main__":
    main()
