"""One torchrun worker for tests/test_distributed.py: joins the group as `lowbit quantize` does
(lowbit.cli reads torchrun's environment) and quantizes the same model with several methods.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/_dist_worker.py MODEL CALIB OUT_ROOT
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from lowbit.api import quantize  # noqa: E402
from lowbit.cli import _torchrun  # noqa: E402
from lowbit.distributed import shutdown  # noqa: E402
from test_distributed import RUNS  # noqa: E402


def main(model: str, calib: str, out_root: str) -> None:
    dist = _torchrun("cpu")
    assert dist is not None and dist.world == 2, "run under torchrun with 2 processes"
    for name, kwargs in RUNS.items():
        quantize(model, str(Path(out_root) / name), calib_dataset=calib, progress=False, dist=dist, **kwargs)
    shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
