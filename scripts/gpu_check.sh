#!/usr/bin/env bash
# GPU check, one call on a GPU machine: the GPU tests, then every benchmark. Prints a summary per step;
# full logs go to $OUT (the device tool's output folder) or ./gpu_check_logs.
#
#   bash scripts/gpu_check.sh            # everything
#   GPU_CHECK_ONLY="tests ss_vae" bash scripts/gpu_check.sh
#   GPU_CHECK_LANES=1 bash scripts/gpu_check.sh   # one step at a time even with several GPUs
#
# With several GPUs the steps run side by side, one lane per GPU (CUDA_VISIBLE_DEVICES); the scaling
# benchmark then runs alone on all of them. GPU_CHECK_LANES may exceed the number of GPUs (at most 4):
# lane i then uses GPU i mod (number of GPUs), e.g. the three test shards side by side on one GPU.
# On a fresh machine (empty Triton and Inductor caches) the whole check is more than one 10-minute
# device call: run it as two calls,
#   GPU_CHECK_ONLY="tests" GPU_CHECK_LANES=3 bash scripts/gpu_check.sh   # 1 GPU: about 8.5 min with pytest-xdist
# (on a GPU under 120 GiB, e.g. an H100, tests_flow then runs after the other two shards, see BIG_STEPS,
# which passes 10 minutes: there run GPU_CHECK_ONLY="tests_attn tests_rest" GPU_CHECK_LANES=2, then
# GPU_CHECK_ONLY=tests_flow)
#   GPU_CHECK_ONLY="ss_vae sparse attention train toolkit scaling" bash scripts/gpu_check.sh
# The benchmarks of the second call run side by side on a 4-GPU machine; even there the training
# benchmarks did not all finish inside one 10-minute call (session 5): run GPU_CHECK_ONLY=train alone
# if they time out.
# Each step is stopped after GPU_CHECK_STEP_TIMEOUT seconds (default 540) and reported as timed out, so
# a call always ends with the summary. Benchmarks of one lane
# share the host (CPU, PCIe) with the other lanes: compare rows within one run. Host-bound rows (the
# SLat flow step with the config's batch_split 4, see docs/PERFORMANCE_flow.md) move with the CPU load
# of the other lanes by up to 1.6x: time them alone (GPU_CHECK_ONLY=train GPU_CHECK_LANES=1).
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
wanted() { case " $ONLY " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# name -> command; "tests" is three shards and "train" two, so that they spread over the GPUs
GPU_TESTS="$PY -m pytest -q -m gpu -p no:cacheprovider -rfE --tb=short"
# The GPU tests spend most of their time compiling Triton kernels, one at a time per process. With
# pytest-xdist importable (carry its wheels in .whl/: `pip download --no-deps --only-binary=:all:
# --python-version 3.12 -d .whl pytest-xdist execnet`) each test shard runs in GPU_CHECK_TEST_WORKERS
# processes (default 6) on its GPU, so the compilations run side by side. Not tests_flow: its real-size
# models need most of a GPU each (six at once ran out of memory on an H200).
GPU_TESTS_PAR=$GPU_TESTS
if $PY -c "import xdist" 2>/dev/null; then
    GPU_TESTS_PAR="$GPU_TESTS -n ${GPU_CHECK_TEST_WORKERS:-6}"
else
    echo "note: pytest-xdist is missing here; the GPU tests run in one process (slower: see the header)"
fi
declare -A CMD=(
    [tests_attn]="$GPU_TESTS_PAR tests/test_attention.py"
    [tests_flow]="$GPU_TESTS tests/test_flow_configs_gpu.py"
    [tests_rest]="$GPU_TESTS_PAR tests --ignore=tests/test_flow_configs_gpu.py --ignore=tests/test_attention.py"
    [ss_vae]="$PY scripts/bench_ss_vae.py"
    [sparse]="$PY scripts/bench_sparse.py"
    [attention]="$PY scripts/bench_attention.py --kernel-time --roofline"
    [attention_dense]="$PY scripts/bench_sdpa_dense.py"
    [train_ss]="$PY scripts/bench_train.py --which ss --modes inflat_all,bf16 --compile ss:bf16"
    [train_slat]="$PY scripts/bench_train.py --which slat --modes inflat_all --compile slat:inflat_all"
    [train_split1]="$PY scripts/bench_train.py --which slat --modes none --compile slat:inflat_all --batch_split 1"
    [toolkit]="$PY scripts/bench_toolkit.py --device cuda --limit 5 --stages render,voxelize,extract_feature"
)
# rough durations (s) on a fresh H200 machine with other lanes busy (2026-11-26; the test shards with
# pytest-xdist, the three shards sharing one GPU; the train figures are lower bounds), longest first: used
# to balance the lanes
declare -A EST=([tests_attn]=490 [tests_rest]=310 [tests_flow]=290 [train_slat]=300 [train_ss]=250
                [attention]=180 [train_split1]=150 [toolkit]=90 [sparse]=60 [ss_vae]=60 [attention_dense]=30)
steps=()
for s in tests_attn tests_rest train_slat tests_flow train_ss attention train_split1 toolkit sparse ss_vae \
         attention_dense; do
    wanted "${s%%_*}" || wanted "$s" && steps+=("$s")
done
STEP_TIMEOUT=${GPU_CHECK_STEP_TIMEOUT:-540}

run_step() {  # run_step NAME: runs it, logs to $LOG/NAME.log, exit code to $LOG/NAME.rc
    local name=$1 t0=$SECONDS
    timeout "$STEP_TIMEOUT" ${CMD[$name]} > "$LOG/$name.log" 2>&1
    local rc=$?
    echo "$rc $((SECONDS - t0))" > "$LOG/$name.rc"
}
report() {  # report NAME: tail of the log and the exit code; returns the exit code
    local name=$1 rc secs
    read -r rc secs < "$LOG/$name.rc" 2>/dev/null || { rc=1; secs=0; }
    echo "=== $name: ${CMD[$name]}"
    tail -n 25 "$LOG/$name.log"
    if [ "$rc" = 124 ]; then
        echo "=== $name: TIMED OUT after $secs s (GPU_CHECK_STEP_TIMEOUT=$STEP_TIMEOUT)"
    else
        echo "=== $name: exit $rc in $secs s"
    fi
    return "$rc"
}

$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
ngpu=$($PY -c "import torch; print(torch.cuda.device_count())")
[ "$ngpu" -ge 1 ] || { echo "no CUDA device"; exit 1; }
lanes=${GPU_CHECK_LANES:-$ngpu}
[ "$lanes" -gt 4 ] && lanes=4
[ "$lanes" -lt 1 ] && lanes=1
status=0
# Steps that need most of an 80 GB card (real-size models: the flow configs' tryruns, the training
# benchmarks). Where lanes share a GPU of less than GPU_CHECK_BIG_GIB (default 120) GiB, e.g. the three
# test shards on one H100, they run after the shared lanes, alone: side by side they ran out of memory
# (session 8, H100: the flow tryruns at 54 GiB beside the attention tests at 37 GiB).
BIG_STEPS=" tests_flow train_ss train_slat train_split1 "
alone=()
if [ "$lanes" -gt "$ngpu" ]; then
    gib=$($PY -c "import torch; print(torch.cuda.get_device_properties(0).total_memory >> 30)")
    if [ "$gib" -lt "${GPU_CHECK_BIG_GIB:-120}" ]; then
        shared=()
        for s in "${steps[@]}"; do
            case "$BIG_STEPS" in *" $s "*) alone+=("$s") ;; *) shared+=("$s") ;; esac
        done
        [ ${#alone[@]} -gt 0 ] && echo "GPU of $gib GiB shared by $lanes lanes: ${alone[*]} after the lanes, alone"
        steps=("${shared[@]}")
    fi
fi
if [ "$lanes" -le 1 ]; then
    for s in "${steps[@]}"; do run_step "$s"; report "$s" || status=1; done
else
    # Longest step first onto the least-loaded lane; lane i runs its steps one after the other on GPU i.
    load=(); plan=()
    for ((lane = 0; lane < lanes; lane++)); do load[lane]=0; plan[lane]=""; done
    for s in "${steps[@]}"; do
        best=0
        for ((lane = 1; lane < lanes; lane++)); do [ "${load[lane]}" -lt "${load[best]}" ] && best=$lane; done
        load[best]=$((load[best] + EST[$s])); plan[best]="${plan[best]} $s"
    done
    for ((lane = 0; lane < lanes; lane++)); do
        echo "lane $lane (GPU $((lane % ngpu))):${plan[lane]}"
        (
            export CUDA_VISIBLE_DEVICES=$((lane % ngpu))
            for s in ${plan[lane]}; do run_step "$s"; done
        ) &
    done
    wait
    for s in "${steps[@]}"; do report "$s" || status=1; done
fi
for s in "${alone[@]}"; do run_step "$s"; report "$s" || status=1; done
# Scaling needs several GPUs (1, 2 and 4 are measured where present) and runs alone.
if wanted scaling && [ "$ngpu" -gt 1 ]; then
    CMD[scaling]="$PY scripts/bench_scaling.py --gpus 1,2$([ "$ngpu" -ge 4 ] && echo ,4) --json $LOG/scaling.json"
    run_step scaling
    report scaling || status=1
fi
exit $status
