"""bench/dev/hybrid_layers.py — a float model whose first N decoder layers' linears come from another
(dequantized, e.g. a peer's fake-quant) checkpoint: compares methods on a few layers, as
`lowbit quantize --layers 0-5 --format fake` does for lowbit's own (tuning aid).

    python bench/dev/hybrid_layers.py BASE_DIR DONOR_DIR N OUT_DIR
"""
from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file


def main() -> None:
    base, donor, n, out = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    out.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    tensors, theirs = load_file(base / "model.safetensors"), load_file(donor / "model.safetensors")
    taken = 0
    for name in tensors:
        m = re.match(r"model\.layers\.(\d+)\..*proj\.weight$", name)
        if m and int(m.group(1)) < n:
            tensors[name] = theirs[name].to(tensors[name].dtype)
            taken += 1
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    print(f"{taken} linears of layers 0-{n - 1} from {donor}")


if __name__ == "__main__":
    main()
