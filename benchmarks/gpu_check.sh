#!/usr/bin/env bash
# One command for a node with GPUs: the CUDA paths of minipipe, run and tabulated.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, its venv active
#
# It runs (1) the gpu-marked tests, (2) lessons 00-04 and 09 on CUDA (nbmake), (3) for
# p = 1, 2, 4, 8 (as many as there are GPUs; NCCL): an MLP with 1F1B in fp32 and bf16
# against reference(), printing per rank the activation bytes the meter observed next to
# torch.cuda.max_memory_allocated. Paste its output into benchmarks/RESULTS.md (GPU section).
# Written without a GPU at hand: it has not been run yet.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -lt 1 ]; then echo "no CUDA device visible: nothing to check" >&2; exit 2; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, platform; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'nccl', torch.cuda.nccl.version(), 'python', platform.python_version())"

echo "== gpu-marked tests"
$PY -m pytest -q -m gpu tests/ || echo "(gpu tests failed: see above)"

echo "== lessons 00-04 and 09 on CUDA"
$PY -m pytest -q --nbmake notebooks/0[0-4]_*.ipynb notebooks/09_*.ipynb || echo "(a lesson failed)"

echo "== 1F1B MLP on p GPUs (NCCL): fp32 and bf16 against reference()"
$PY - "$GPUS" <<'PYEOF'
import sys

import torch.nn.functional as F

from minipipe import make_schedule
from minipipe.loaders import per_step
from minipipe.models import mlp_batch, mlp_specs
from minipipe.runtime import reference, train

gpus = int(sys.argv[1])
specs = mlp_specs(layers=8, width=1024, d_in=1024, d_out=1024)


def batch(k):
    return mlp_batch(256, d_in=1024, d_out=1024, seed=k)


data = per_step(batch, steps=5)
print(f"{'p':>2} {'dtype':>5} {'backend':>7} {'step ms':>8} {'max |dloss|':>11}  "
      "per rank: activation MiB (meter) / cuda max allocated MiB")
for p in (1, 2, 4, 8):
    if p > gpus:
        break
    for dtype in ("fp32", "bf16"):
        res = train(specs, F.mse_loss, make_schedule("1f1b", p, 8), data, dtype=dtype,
                    backend="nccl" if p > 1 else "auto")
        ref = reference(specs, F.mse_loss, data, dtype=dtype)
        diff = max(abs(a - b) for a, b in zip(res.losses, ref["losses"]))
        cols = "  ".join(f"{a / 2**20:.1f}/{c / 2**20:.1f}" for a, c in
                         zip(res.peak_activation_bytes, res.cuda_peak_bytes or []))
        print(f"{p:>2} {dtype:>5} {res.info['backend']:>7} {res.step_time * 1e3:>8.1f} "
              f"{diff:>11.2e}  {cols}")
PYEOF
