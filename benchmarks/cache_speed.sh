#!/usr/bin/env bash
# Training throughput and data wait with the memory-mapped cache (this checkout) against the in-RAM cache of
# commit d8e582e, on the hippocampus benchmark's 32 x 48 x 32 configuration, 3 minutes each, alternating, ROUNDS
# times (default 2).
# Needs ../shared/data/msd-hippocampus; results in benchmarks/results/cache_speed-{new,old}.json.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
data=$(cd ../shared/data/msd-hippocampus && pwd)
old=/tmp/old-main
[ -d "$old" ] || git worktree add --detach "$old" d8e582e
for round in $(seq 1 "${ROUNDS:-2}"); do
  "$repo/.venv/bin/python" benchmarks/run.py --configs res_unet3d_fullres8_affine30_p32_speed_only --budget 3 \
    --tuned --seeds "$round" --data "$data" --runs /tmp/cache-speed/new \
    --results "$repo/benchmarks/results/cache_speed-new.json"
  (cd "$old" && "$repo/.venv/bin/python" benchmarks/run.py --configs res_unet3d_fullres8_affine30_p32 --budget 3 \
    --tuned --seeds "$round" --data "$data" --runs /tmp/cache-speed/old \
    --results "$repo/benchmarks/results/cache_speed-old.json")
done
