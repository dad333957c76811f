#!/usr/bin/env bash
# CUDA checks of every method (tiny budgets) + timings; run on a machine with a CUDA GPU.
#
#     bash benchmarks/gpu_check.sh [LOG]        # LOG: default benchmarks/results/gpu_check.log
#
# Runs from the repository root wherever it is called from, prints everything and writes the same
# text to LOG. benchmarks/results/gpu_check_h100.log is its output on one NVIDIA H100 80GB HBM3
# (`bash benchmarks/gpu_check.sh benchmarks/results/gpu_check_h100.log`): the README's GPU figures.
# Needs python3 with a CUDA build of torch and iterflow's dependencies, and GNU time (/usr/bin/time).
# Wheels of dependencies missing there (POT for the minibatch-OT coupling) can be put in .whl/
# (git-ignored): they are installed offline into /tmp/site. The run folders go to /tmp/gpu.
set -u
cd "$(dirname "$0")/.." || exit 1
LOG=${1:-benchmarks/results/gpu_check.log}
mkdir -p "$(dirname "$LOG")"
{
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
IF="python3 -m iterflow.cli"
R=/tmp/gpu; rm -rf $R; mkdir -p $R
nvidia-smi -L
run() { echo "== $*"; /usr/bin/time -f "   wall %e s" "$@" 2>&1 | grep -vE "Warning|warn\(" | tail -4; }
run $IF train --device cuda --method fm --data checkerboard --steps 6000 --out $R/fm --quiet --eval-n 2000
python3 -c "import json;m=json.load(open('$R/fm/metrics.json'));print('fm cuda nll',m['nll'],'gap',m['nll_gap'],'train_s',m['train_seconds'])"
run $IF train --device cuda --method fm -o coupling=ot --data checkerboard --steps 2000 --out $R/fmot --quiet --no-report
run $IF train --device cuda --method cnf --data 8gaussians --steps 200 --hidden 64,64 --out $R/cnf --quiet --eval-n 500
run $IF train --device cuda --method jko --blocks 3 --data 8gaussians --steps 200 --hidden 64,64 --out $R/jko --quiet --eval-n 500
run $IF train --device cuda --method local-fm --blocks 3 --data 8gaussians --steps 300 --hidden 64,64 --out $R/lfm --quiet --eval-n 500
run $IF reflow $R/fm --device cuda --out $R/rf --steps 500 --quiet
run $IF eval $R/jko --device cuda --json --n 500
run $IF train --device cuda --data digits8 --network unet --steps 300 --out $R/img --quiet --eval-n 200
python3 - <<'PY'
import time, torch
from iterflow.nn import MLPVelocity
from iterflow.flow import Flow, Block
dev = "cuda"
net = MLPVelocity(2, hidden=(256,256,256)).to(dev)
opt = torch.optim.Adam(net.parameters(), 1e-3)
x = torch.randn(1024, 2, device=dev)
for it in range(2):
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(500):
        s = torch.rand(1024, device=dev); z = torch.randn_like(x)
        xt = x + s[:, None] * (z - x)
        loss = (net(xt, s) - (z - x)).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
    torch.cuda.synchronize()
print("raw FM step on H100: %.0f steps/s" % (500 / (time.perf_counter() - t0)))
flow = Flow([Block(net)], (2,)).to(dev)
with torch.no_grad():
    z = torch.randn(100000, 2, device=dev); torch.cuda.synchronize(); t0 = time.perf_counter()
    flow.decode(z, solver="rk4", steps=8); torch.cuda.synchronize()
    print("sampling NFE 32: %.0f samples/s" % (100000 / (time.perf_counter() - t0)))
    xs = torch.randn(20000, 2, device=dev); torch.cuda.synchronize(); t0 = time.perf_counter()
    flow.log_prob(xs, solver="rk4", steps=8); torch.cuda.synchronize()
    print("exact NLL rk4-8: %.0f points/s" % (20000 / (time.perf_counter() - t0)))
PY
} 2>&1 | tee "$LOG"
