"""Regenerate llama_cpp_quants.npz: `golden.py inputs WORK`, `run.sh GGML WORK`, `golden.py pack WORK`.

The inputs are the ones stored in the npz (W [rows, cols] float32 and an imatrix [cols] per case).
"""
import sys
from pathlib import Path

import numpy as np

NPZ = Path(__file__).parent.parent / "llama_cpp_quants.npz"
TYPES = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]


def inputs(work: Path) -> None:
    z = np.load(NPZ)
    (work / "in").mkdir(parents=True, exist_ok=True)
    (work / "out").mkdir(exist_ok=True)
    for case in sorted({k.split("/")[0] for k in z.files}):
        W = z[f"{case}/W"]
        W.tofile(work / "in" / f"{case}.f32")
        z[f"{case}/imatrix"].tofile(work / "in" / f"{case}.imatrix.f32")
        (work / "in" / f"{case}.shape").write_text(f"{W.shape[0]} {W.shape[1]}\n")


def pack(work: Path) -> None:
    old = np.load(NPZ)
    arrs = {}
    for case in sorted({k.split("/")[0] for k in old.files}):
        W = old[f"{case}/W"]
        arrs[f"{case}/W"], arrs[f"{case}/imatrix"] = W, old[f"{case}/imatrix"]
        for t in TYPES:
            for sfx in ("", ".imatrix"):
                if t == "q8_0" and sfx:
                    continue  # llama.cpp ignores the imatrix for Q8_0
                raw = np.fromfile(work / "out" / f"{case}.{t}{sfx}.bin", dtype=np.uint8)
                arrs[f"{case}/{t}{sfx}"] = raw.reshape(W.shape[0], -1)
    np.savez_compressed(NPZ, **arrs)


if __name__ == "__main__":
    {"inputs": inputs, "pack": pack}[sys.argv[1]](Path(sys.argv[2]))
