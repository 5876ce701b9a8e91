#!/usr/bin/env bash
# GPU check, one call on a GPU machine: the GPU tests, then every benchmark. Prints a summary table per
# benchmark; full logs go to $OUT (the device tool's output folder) or ./gpu_check_logs.
#
#   bash scripts/gpu_check.sh            # everything
#   GPU_CHECK_ONLY="tests ss_vae" bash scripts/gpu_check.sh
#
# Uses the python that has torch with CUDA (PYTHON, default python3). Results go into docs/PERFORMANCE.md
# by hand, with the card and the date.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=${OUT:-gpu_check_logs}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# A GPU machine without package access: wheels carried in .whl/ (e.g. trimesh for the toolkit benchmark,
# `pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl trimesh`) are installed here.
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_check_site .whl/*.whl \
        && export PYTHONPATH="/tmp/gpu_check_site:$PYTHONPATH"
fi
$PY -c "import trimesh" 2>/dev/null || echo "note: trimesh is missing here; the toolkit benchmark will fail (carry it in .whl/)"
ONLY=${GPU_CHECK_ONLY:-"tests ss_vae sparse attention train toolkit scaling"}
status=0
step() {  # step NAME CMD...
    local name=$1; shift
    case " $ONLY " in *" $name "*) ;; *) return 0 ;; esac
    echo "=== $name: $*"
    local t0=$SECONDS
    "$@" > "$LOG/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$LOG/$name.log"
    echo "=== $name: exit $rc in $((SECONDS - t0)) s"
    [ $rc -eq 0 ] || status=1
}
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
step tests $PY -m pytest -q -m gpu -p no:cacheprovider tests
step ss_vae $PY scripts/bench_ss_vae.py
[ -f scripts/bench_sparse.py ] && step sparse $PY scripts/bench_sparse.py
[ -f scripts/bench_attention.py ] && step attention $PY scripts/bench_attention.py
[ -f scripts/bench_train.py ] && step train $PY scripts/bench_train.py
step toolkit $PY scripts/bench_toolkit.py --device cuda --limit 5 --stages render,voxelize,extract_feature
# Scaling needs several GPUs (1, 2 and 4 are measured where present).
ngpu=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$ngpu" -gt 1 ]; then
    gpus=1,2; [ "$ngpu" -ge 4 ] && gpus=1,2,4
    step scaling $PY scripts/bench_scaling.py --gpus "$gpus" --json "$LOG/scaling.json"
fi
exit $status
