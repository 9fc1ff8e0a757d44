#!/usr/bin/env bash
# The whole GPU benchmark run in one command, on a CUDA machine with no network.
#
#   bash benchmarks/gpu_run.sh [extra `entropy-gpu bench` arguments]
#
# Installs nothing from a network. It uses the machine's python3 (torch, triton,
# transformers), puts a copy of this checkout's package on PYTHONPATH, and installs
# the optional comparison packages offline from .whl/ when that folder is there
# (made by benchmarks/fetch_wheels.sh where PyPI is reachable; with the device tool,
# name ".whl" in `carry`). Packages that are absent or do not import are skipped
# with the reason in the reports.
#
# Writes benchmarks/results/<device>-<date>.{json,md,png} and a log; when $OUT is
# set (the device tool), copies them there too. The commit recorded is
# $ENTROPY_GPU_COMMIT when set (a copied tree may have no .git), else git's HEAD.
# Defaults: cases forward, forward_backward, linear (the last two run once our API
# has them); shapes 8192x151936 16384x128256 4096x32000 1024x262144 128x151936;
# bf16 and fp32. Split a long run with e.g. `--case forward --dtype bf16 --name X`.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
site=${ENTROPY_GPU_SITE:-/tmp/entropy_gpu_site}
rm -rf "$site" && mkdir -p "$site"

# This checkout's package, laid out as installed (kernels/ becomes entropy_gpu/kernels).
cp -r entropy_gpu "$site/entropy_gpu"
rm -rf "$site/entropy_gpu/kernels" && cp -r kernels "$site/entropy_gpu/kernels"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site/wheels" .whl/*.whl
  export PYTHONPATH="$site:$site/wheels${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "no .whl/: TRL, verl and Liger are benchmarked only if the machine already has them"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
# Keep the checkout's root (and its top-level kernels/ folder) off sys.path.
export PYTHONUNBUFFERED=1
if [ -z "${ENTROPY_GPU_COMMIT:-}" ] && git rev-parse HEAD >/dev/null 2>&1; then
  ENTROPY_GPU_COMMIT=$(git rev-parse HEAD)$(git diff --quiet HEAD -- . 2>/dev/null || echo +dirty)
fi
export ENTROPY_GPU_COMMIT=${ENTROPY_GPU_COMMIT:-unknown}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv || true
"$py" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); assert torch.cuda.is_available(), 'no CUDA device'"

slug=$("$py" -c "import torch; from entropy_gpu.bench import device_slug; print(device_slug(torch.device('cuda')))")
name="$slug-$(date -u +%Y-%m-%d)"
mkdir -p benchmarks/results
log="benchmarks/results/$name.log"
set +e
"$py" -m entropy_gpu bench --device cuda --out-dir benchmarks/results --name "$name" \
  --note "run by benchmarks/gpu_run.sh" "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
if [ -n "${OUT:-}" ]; then
  cp benchmarks/results/"$name".* "$OUT"/ 2>/dev/null || true
fi
exit "$status"
