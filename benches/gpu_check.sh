#!/usr/bin/env bash
# One prepared run for a GPU machine (issue 8): gpu tests, kernel / step / loader benchmarks, one table at the end.
# Sized for < 8 minutes; every stage has its own `timeout`, and the whole run a budget (GPU_CHECK_BUDGET_S, 470 s).
#
# ---- Usage (from the repo root of a checkout WITH a Rust toolchain, i.e. the dev machine) --------------------------
#   # 1. wheels the GPU image lacks (it has torch 2.11, triton, transformers, accelerate, peft; not diffusers,
#   #    webdataset, braceexpand). .whl/ is git-ignored (.gitignore), so only `carry` takes it along:
#   rm -rf .whl && mkdir .whl
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl diffusers==0.42.1 webdataset==1.0.2 braceexpand==0.1.7 importlib_metadata lazy-importer
#   # 2. the fastlcm wheel (abi3, so the cp311 build here runs on the image's Python 3.12), and the commit it is of:
#   maturin build --release --out .whl          # (pip wheel . --no-deps -w .whl does the same through pip)
#   git rev-parse --short HEAD > .whl/COMMIT; git diff --quiet HEAD || echo "$(cat .whl/COMMIT)+dirty" > .whl/COMMIT
#   ls -la .whl    # fastlcm-0.1.0-cp311-abi3-manylinux_2_34_x86_64.whl (8 MB), diffusers (6 MB), webdataset, braceexpand
#   # 3. the device tool (no kind: an H100 or H200; the card's name is in the output and every CSV row):
#   #    run(command="bash benches/gpu_check.sh", carry=[".whl"], timeout_s=560)
#   #    It returns up to 8 files from $OUT: summary.txt, log.txt, step.csv, kernels.csv, loader.csv, results.tar.gz
#   #    (every JSON, stderr and the pytest log). Append the CSV rows to benches/results/{step,kernels,loader}.csv.
#   #    Then give_back unless you rerun at once.
# Outside the device tool $OUT is unset: the files go to ./gpu_check_out instead.
# Stages run in the order GPU_CHECK_STAGES names them. The default is what is still unmeasured after the runs of
# benches/results/gpu/README.md (runs 4-6 measured the kernels with rotated inputs, the lever ablations, +compile-ro
# and the warm compile cache): "tests step_lora step_sdxl" -- first the GPU tier of GPU_CHECK_TESTS (default: the
# trainer's lever tests, whose reduce-overhead case for all three UNets has not run on a GPU yet, and
# tests/training/test_lora.py, LoRA with its one compiled UNet under reduce-overhead against eager, cut by the 90 s per-test
# limit in run 6; both now have a limit of their own), then with what is left of the budget the LCM-LoRA step (SD1.5,
# rank 64, cached latents, bf16; GPU_CHECK_LORA_EXTRA=--compile adds torch.compile) and the SDXL step (1024 px,
# batch 4, cached latents, gradient checkpointing). Others: kernels_wrapper, kernels, kernels_graph, kernels_compile,
# loader, step_bf16, step_fp16, step_matrix (DEFAULT_MATRIX below: +latents, +compile and +compile-ro on one machine,
# about 7 min from a cold compile cache, alone), compile_cache (the matrix's CACHE_SET again in a new process, from the
# compile cache the matrix left: what a second `fastlcm train` pays). Caps: GPU_CHECK_TESTS_CAP, GPU_CHECK_MATRIX_CAP,
# GPU_CHECK_CACHE_CAP, GPU_CHECK_LORA_CAP. Other test files for GPU_CHECK_TESTS: tests/kernels/test_kernels.py
# tests/kernels/test_kernels_gpu.py tests/training/test_train_gpu.py tests/data/test_precompute.py.
# Matrix sets: GPU_CHECK_MATRIX (comma list or "all"; images+compile adds another ~200 s of compile).
# GPU_CHECK_SMOKE=1 runs the same stages on a CPU at toy sizes (tiny teacher, 24 images; tests only collected), to
# check the script itself before spending device time: GPU_CHECK_SMOKE=1 bash benches/gpu_check.sh  (~30 s)
# ---------------------------------------------------------------------------------------------------------------------
set -u
START=$SECONDS
BUDGET=${GPU_CHECK_BUDGET_S:-470}
OUT=${OUT:-$PWD/gpu_check_out}
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}

echo "== gpu_check.sh $(date -u +%Y-%m-%dT%H:%M:%SZ)"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "pip install of .whl/*.whl failed"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
    echo "no .whl/ folder: using whatever fastlcm/diffusers this python already has"
fi
export FASTLCM_COMMIT=${FASTLCM_COMMIT:-$(cat .whl/COMMIT 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo unknown)}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee "$WORK/nvidia-smi.txt"
$PY - <<'EOF' | tee "$WORK/versions.txt"
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "triton", "diffusers", "transformers", "accelerate", "peft", "webdataset", "fastlcm"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"), getattr(m, "__file__", ""))
    except Exception as e:  # noqa: BLE001
        print(name, "MISSING:", e)
import torch
print("cuda available:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF

STAGES=${GPU_CHECK_STAGES:-tests step_lora step_sdxl}
DEFAULT_MATRIX=+latents,+compile,+compile-ro
if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
    TESTS_MODE="--collect-only"; export OMP_NUM_THREADS=1
    KERNELS_ARGS="--device cpu --sizes 2x4x8x8 --warmup 1 --iters 2"; KCOMPILE_SIZES="2x4x8x8"; KGRAPH=""
    WRAPPER_ARGS="--device cpu --sizes 2x4x8x8 --calls 100 --rounds 1"
    STEP_ARGS="--family tiny --batch-size 2 --steps 2 --warmup 1 --parts-steps 1 --device cpu"
    SDXL_ARGS="$STEP_ARGS --input latents"
    MATRIX_ARGS="--family tiny --batch-size 2 --steps 2 --warmup 1 --parts-steps 0 --device cpu"
    MATRIX_SETS=${GPU_CHECK_MATRIX:-reference-bf16,latents:split-cfg}
    CACHE_SET=reference-bf16  # (a CPU compile of the tiny UNets takes minutes: the smoke run only checks the plumbing)
    FP16="no"
    LOADER_ARGS="--synthetic 24 --threads 2 --seconds 1 --decode-images 4 --min-size 128 --max-size 192 --resolution 128"
else
    TESTS_MODE="--timeout 90"
    KERNELS_ARGS="--warmup 10 --iters 100"; KCOMPILE_SIZES="sd15:12,sdxl:12"; KGRAPH="--cuda-graph"
    WRAPPER_ARGS="--sizes sd15:12"
    STEP_ARGS="--family sd15 --batch-size 12 --resolution 512 --steps 20"
    SDXL_ARGS="--family sdxl --batch-size 4 --resolution 1024 --steps 10 --warmup 3 --parts-steps 2 --input latents \
        --gradient-checkpointing"
    MATRIX_ARGS="--family sd15 --batch-size 12 --resolution 512 --steps 15 --warmup 4 --parts-steps 3"
    MATRIX_SETS=${GPU_CHECK_MATRIX:-$DEFAULT_MATRIX}
    CACHE_SET=+compile-ro
    FP16="fp16 --gradient-checkpointing"
    LOADER_ARGS="--synthetic 256 --threads 16 --seconds 8 --decode-images 96"
fi

declare -A RC SECS
ORDER=()
# stage NAME CAP_S CMD... : run with a time cap (shrunk to what is left of the budget), stdout/stderr to $WORK
stage() {
    local name=$1 cap=$2; shift 2
    ORDER+=("$name")
    local left=$((BUDGET - (SECONDS - START)))
    [ "$cap" -gt "$left" ] && cap=$left
    if [ "$cap" -lt 20 ]; then RC[$name]="no time"; SECS[$name]=0; echo "== $name: skipped, budget spent"; return; fi
    echo "== $name (cap ${cap}s): $*"
    local t0=$SECONDS
    timeout -k 10 "$cap" "$@" > "$WORK/$name.out" 2> "$WORK/$name.err"
    RC[$name]=$?
    SECS[$name]=$((SECONDS - t0))
    [ "${RC[$name]}" = 124 ] && RC[$name]="124 (timeout)"
    tail -n 5 "$WORK/$name.err"
    echo "== $name: rc ${RC[$name]}, ${SECS[$name]} s"
}

# run_stage NAME: one named stage (GPU_CHECK_STAGES lists them, in the order they run)
# shellcheck disable=SC2086  # the *_ARGS strings are word-split on purpose
run_stage() {
    case $1 in
    tests)
        stage tests "${GPU_CHECK_TESTS_CAP:-360}" $PY -m pytest -m gpu -q -p no:cacheprovider $TESTS_MODE \
            ${GPU_CHECK_TESTS:-tests/training/test_train_gpu.py::test_levers_keep_the_losses_on_cuda tests/training/test_lora.py}
        cp "$WORK/tests.out" "$WORK/pytest.txt" 2>/dev/null; tail -n 3 "$WORK/tests.out" 2>/dev/null ;;
    kernels_wrapper) stage kernels_wrapper 40 $PY -m fastlcm bench kernels --wrapper-overhead \
        --record "$OUT/kernel_wrapper.csv" $WRAPPER_ARGS ;;
    kernels) stage kernels 60 $PY -m fastlcm bench kernels --no-compile --json --record "$OUT/kernels.csv" $KERNELS_ARGS ;;
    kernels_graph) stage kernels_graph 60 $PY -m fastlcm bench kernels --no-compile $KGRAPH --json \
        --record "$OUT/kernels.csv" $KERNELS_ARGS ;;
    kernels_compile) stage kernels_compile 80 $PY -m fastlcm bench kernels --json --record "$OUT/kernels.csv" \
        $KERNELS_ARGS --sizes "$KCOMPILE_SIZES" ;;
    loader) stage loader 60 $PY -m fastlcm bench loader $LOADER_ARGS --vs-webdataset --json --out-csv "$OUT/loader.csv" ;;
    step_bf16) stage step_bf16 100 $PY -m fastlcm bench step $STEP_ARGS --mixed-precision bf16 --json \
        --out-csv "$OUT/step.csv" ;;
    step_fp16) stage step_fp16 100 $PY -m fastlcm bench step $STEP_ARGS --mixed-precision $FP16 --json \
        --out-csv "$OUT/step.csv" ;;
    step_sdxl) stage step_sdxl 150 $PY -m fastlcm bench step $SDXL_ARGS --json --out-csv "$OUT/step.csv" ;;
    step_lora) stage step_lora "${GPU_CHECK_LORA_CAP:-150}" $PY -m fastlcm bench step $STEP_ARGS --input latents \
        --lora-rank 64 --mixed-precision bf16 ${GPU_CHECK_LORA_EXTRA:-} --json --out-csv "$OUT/step.csv" ;;
    step_matrix) stage step_matrix "${GPU_CHECK_MATRIX_CAP:-400}" $PY -m fastlcm bench step $MATRIX_ARGS \
        --matrix "$MATRIX_SETS" --out-csv "$OUT/step.csv" ;;
    compile_cache) stage compile_cache "${GPU_CHECK_CACHE_CAP:-150}" $PY -m fastlcm bench step $MATRIX_ARGS --steps 5 \
        --parts-steps 0 --matrix "$CACHE_SET" --out-csv "$OUT/step.csv" ;;
    *) echo "== unknown stage $1 (GPU_CHECK_STAGES)"; ORDER+=("$1"); RC[$1]="unknown"; SECS[$1]=0 ;;
    esac
}
for name in $STAGES; do run_stage "$name"; done

# ---- one table ----
{
    echo "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $FASTLCM_COMMIT, $(head -n1 "$WORK/nvidia-smi.txt"), total $((SECONDS - START)) s"
    for name in "${ORDER[@]}"; do printf '%-10s rc %-14s %4s s\n' "$name" "${RC[$name]}" "${SECS[$name]}"; done
    WORK=$WORK $PY - <<'EOF'
import json, os
w = os.environ["WORK"]
def load(name):
    try:
        text = open(os.path.join(w, name + ".out")).read().strip()
        return json.loads(text[text.index("{"):]) if text else None
    except (OSError, ValueError):
        return None
try:
    lines = [l for l in open(os.path.join(w, "tests.out")).read().splitlines() if l.strip()]
    print("tests:", lines[-1] if lines else "(no output)")
except OSError:
    print("tests: (not run)")
for kname in ("kernels", "kernels_graph", "kernels_compile"):
  k = load(kname)
  if k:
    rows = [r for r in k["rows"] if r["impl"] == "triton"]
    bad = [r for r in rows if r["check"] != "ok"]
    print(f"{kname}: copy {k['copy_gbps']:.0f} GB/s; {len(rows)} triton cases, {len(bad)} mismatches; "
          "triton %copy-bw min/median/max: " + "/".join(
              f"{v:.0f}" for v in (lambda s: (s[0], s[len(s) // 2], s[-1]))(sorted(r["pct_copy_bw"] for r in rows))))
    for r in (r for r in k["rows"] if r["impl"] != "eager"):
        print(f"  {r['op']:<13}{r['shape']:<16}{r['impl']:<8}{r['ms']:>8.3f} ms{r['gbps']:>7.0f} GB/s{r['pct_copy_bw']:>5.0f}%"
              f"  x{r['speedup_vs_eager'] or 0:.2f} vs eager  {r['check']}")
print(f"{'step':<34}{'samples/s':>10}{'step s':>9}{'peak GiB':>10}  parts (s, instrumented: vae/text/teacher/target/student/opt/loader)")
for name in ("step_bf16", "step_fp16", "step_sdxl", "step_lora"):
    s = load(name)
    if not os.path.exists(os.path.join(w, name + ".out")):
        continue
    if not s:
        print(f"{name:<34}(failed: see {name}.err in results.tar.gz)")
        continue
    c, p = s["config"], s["parts"]
    label = f"{c['family']} b{c['batch_size']} {c['resolution']} {c['mixed_precision']}" + ("+ckpt" if c["gradient_checkpointing"] else "")
    label += f" lora{c['lora_rank']}" if c.get("lora_rank") else ""
    parts = "/".join(f"{p.get(x, 0):.3f}" for x in ("vae_encode", "text_encode", "teacher_forward", "target_forward",
                                                    "student_forward_backward", "optimizer", "loader_wait"))
    print(f"{label:<34}{s['samples_per_s']:>10.1f}{s['step_s']:>9.3f}{s['peak_mem_gib'] or 0:>10.1f}  {parts}")
    ref = s["reference"]["matching"]
    if ref:
        r = s["reference"]["runs"][ref]
        print(f"{'  reference H200 ' + ref:<34}{r['samples_per_s']:>10.1f}{r['step_s']:>9.3f}{r['peak_mem_gib']:>10.1f}"
              f"  speed-up {r['step_s'] / s['step_s']:.2f}x (a like-for-like ratio only on an H200)")
for name, tail in (("kernels_wrapper", 7), ("step_matrix", 14), ("compile_cache", 4)):
    try:
        m = open(os.path.join(w, name + ".out")).read().strip().splitlines()
        print(name + ":", *m[-tail:], sep="\n  ")
    except OSError:
        pass
l = load("loader")
if l:
    print(f"loader: fastlcm {l['fastlcm_images_per_s']} img/s vs webdataset {l['webdataset_images_per_s']} img/s "
          f"({l['ratio']}x), {l['threads']} threads, {l['cpu']}")
EOF
} | tee "$OUT/summary.txt"

tar -czf "$OUT/results.tar.gz" -C "$WORK" . && rm -rf "$WORK"
ls -la "$OUT"
sleep 1  # let tee finish log.txt before the files are collected
