#!/usr/bin/env bash
# The pre-flight of every paper config, one compile at a time (docs/tpu.md's table).
# Each row writes benchmarks/tpu_preflight/<row>.json and .txt; a row with a JSON is skipped.
#   nice -n 19 bash benchmarks/tpu_preflight/run_all.sh
set -u
cd "$(dirname "$0")/../.."
out=benchmarks/tpu_preflight
row() {  # row NAME ARGS...
  local name=$1; shift
  [ -f "$out/$name.json" ] && return
  echo "$(date -u +%H:%M:%S) $name: $*"
  python -m reviewkd_jax.preflight "$@" --json="$out/$name.json" > "$out/$name.txt" 2> "$out/$name.err" \
    || echo "  failed: $(tail -1 "$out/$name.err")"
}
BF16=--dtype=bfloat16
row cifar_r56_r20_b128_v5e8        --config=configs/cifar100_r56_r20.py $BF16 --topology=v5e:2x4
row cifar_r32x4_r8x4_b128_v5e8     --config=configs/cifar100_r32x4_r8x4.py $BF16 --topology=v5e:2x4
row coco_faster_r18_r101_v5e8      --config=configs/coco_distill.py:pair=faster_r18_r101,method=reviewkd --topology=v5e:2x4 --per_chip_batch=2
row imagenet_r34_r18_b256_v5e8     --config=configs/imagenet_r34_r18.py $BF16 --topology=v5e:2x4
row imagenet_r50_mobilenet_b256_v5e8 --config=configs/imagenet_r50_mobilenet.py $BF16 --topology=v5e:2x4
row cifar_r56_r20_b1024_v5e8       --config=configs/cifar100_r56_r20.py $BF16 --topology=v5e:2x4 --per_chip_batch=128
row cifar_r32x4_r8x4_b1024_v5e8    --config=configs/cifar100_r32x4_r8x4.py $BF16 --topology=v5e:2x4 --per_chip_batch=128
row imagenet_r34_r18_b256_v5e256   --config=configs/imagenet_r34_r18.py $BF16 --topology=v5e:16x16
row coco_mask_r50_r101_v5e8        --config=configs/coco_distill.py:pair=mask_r50_r101,method=reviewkd --topology=v5e:2x4 --per_chip_batch=2
row coco_faster_r18_r101_v5e256    --config=configs/coco_distill.py:pair=faster_r18_r101,method=reviewkd --topology=v5e:16x16 --per_chip_batch=2
echo "$(date -u +%H:%M:%S) done"
