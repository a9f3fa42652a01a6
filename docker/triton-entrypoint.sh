#!/usr/bin/env bash
# Starts Triton in the NGC container over the mounted model repository.
#   TRITON_ACCELERATOR=none      serve /models as exported (onnxruntime backend, CUDA provider)
#   TRITON_ACCELERATOR=tensorrt  serve a linked copy whose configs add the TensorRT accelerator
#                                (tensorrt-optimization.pbtxt); /models itself is never changed
# Extra arguments go to tritonserver. Research use only; not a medical device.
set -euo pipefail

source_dir="${TRITON_MODEL_SOURCE:-/models}"
accelerator="${TRITON_ACCELERATOR:-none}"
block="${TRITON_TENSORRT_BLOCK:-/opt/brainscan/tensorrt-optimization.pbtxt}"
server="${TRITONSERVER:-tritonserver}"
repository="$source_dir"

case "$accelerator" in
  none | "") ;;
  tensorrt)
    repository="${TRITON_MODEL_DIR:-/tmp/models}"
    for config in "$source_dir"/*/config.pbtxt; do
      model_dir="$(dirname "$config")"
      name="$(basename "$model_dir")"
      if grep -q '^optimization' "$config"; then
        echo "error: $config already has an optimization block; add the TensorRT accelerator there" >&2
        exit 2
      fi
      mkdir -p "$repository/$name"
      for entry in "$model_dir"/*; do
        [ "$(basename "$entry")" = config.pbtxt ] || ln -sfn "$entry" "$repository/$name/"
      done
      cat "$config" "$block" > "$repository/$name/config.pbtxt"
    done
    ;;
  *)
    echo "error: TRITON_ACCELERATOR must be 'none' or 'tensorrt', got '$accelerator'" >&2
    exit 2
    ;;
esac

exec "$server" --model-repository="$repository" --strict-readiness=true --exit-on-error=true "$@"
