#!/usr/bin/env bash
# The recipe comparison behind README "A demo that detects": each configuration of bench/configs/recipe/
# (a delta from the small preset) trained for a number of epochs (0: the untrained initialisation), evaluated on
# the test split (dense mode, every scorer, image AUROC with intervals); swssl-compare then pairs any two.
#
#   bash bench/recipe.sh                                  # every recipe below, on data/demo, into runs/recipe/
#   RECIPES="mobilenet-mid:0 mobilenet-mid:20" bash bench/recipe.sh
#   EVAL_FLAGS="--images 50" bash bench/recipe.sh         # 50 normal + 50 abnormal test images: quicker, wider
#
# A recipe already evaluated is not run again (delete its folder to redo it).
set -euo pipefail
DATA=${DATA:-data/demo}
BIN=${BIN:-.venv/bin}
OUT=${OUT:-runs/recipe}
RECIPES=${RECIPES:-"resnet18-last:0 mobilenet-last:0 mobilenet-mid:0 mobilenet-mid-32:0 mobilenet-mid-32:20
mobilenet-mid-32-lr4:20 mobilenet-mid-32-rescaled:20"}
for item in $RECIPES; do
    name=${item%:*} epochs=${item#*:}
    run=$OUT/$name-e$epochs
    if compgen -G "$run/eval-dense/test-aligned*/eval.json" > /dev/null; then  # -nN: an --images N subset
        continue
    fi
    mkdir -p "$run"
    resume=$([ -f "$run/checkpoint.pt" ] && echo --resume || true)
    "$BIN/swssl-train" --preset small --config "bench/configs/recipe/$name.toml" --data "$DATA" --out "$run" \
        --epochs "$epochs" $resume
    "$BIN/swssl-eval" "$run" --data "$DATA" --split test ${EVAL_FLAGS:-}
done
