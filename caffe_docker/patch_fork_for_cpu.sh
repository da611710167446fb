#!/bin/sh
# Make the deeplab-v2 fork build and run forward passes in a CPU_ONLY build.
# Usage: patch_fork_for_cpu.sh <fork source root>
# Each step says what it changes and why; a step whose target text is missing
# stops the build, so a different fork commit cannot slip through unpatched.
set -eu
root=${1:?usage: patch_fork_for_cpu.sh <deeplab-v2 source root>}
batch_norm="$root/src/caffe/layers/batch_norm_layer.cpp"
interp="$root/include/caffe/util/interp.hpp"

# 1. BatchNorm forward on the CPU aborts with "Check failed: data_".
#    The fork stopped reshaping x_norm_ (the line in Reshape is commented out, to
#    save one activation-sized buffer per BatchNorm) and commented out the copy
#    into x_norm_ at the end of Forward_gpu, but Forward_cpu still ends with
#        caffe_copy(x_norm_.count(), top_data,
#            x_norm_.mutable_cpu_data());
#    x_norm_ never gets memory, so mutable_cpu_data() fails its CHECK. The copy
#    only caches the output for a training backward pass; delete the statement,
#    as the fork's GPU path does. (Backward_cpu still needs x_norm_: CPU training
#    of BatchNorm stays unsupported, as in the fork.)
copy='caffe_copy(x_norm_\.count(), top_data,'
if [ "$(grep -c "$copy" "$batch_norm")" != 1 ]; then
    echo "patch_fork_for_cpu: expected one '$copy' statement in $batch_norm" >&2
    exit 1
fi
# The statement spans two lines in the fork; accept the one-line form as well.
sed -i \
    -e "/$copy *x_norm_\.mutable_cpu_data());/d" \
    -e "/$copy *\$/{N;/\\n *x_norm_\\.mutable_cpu_data());/d;}" \
    "$batch_norm"
if grep -q "$copy" "$batch_norm"; then
    echo "patch_fork_for_cpu: could not remove the x_norm_ copy from $batch_norm" >&2
    exit 1
fi
echo "patch_fork_for_cpu: removed the x_norm_ copy from BatchNormLayer::Forward_cpu"

# 2. The interpolation header (used by the Interp layer's CPU code) includes
#    <cublas_v2.h> unconditionally, which a CPU_ONLY build without CUDA headers
#    cannot compile. Nothing it declares uses cuBLAS types; guard the include.
if grep -q '^#include <cublas_v2.h>' "$interp"; then
    sed -i 's|^#include <cublas_v2.h>.*$|#ifndef CPU_ONLY\n&\n#endif|' "$interp"
    echo "patch_fork_for_cpu: guarded <cublas_v2.h> in $interp with #ifndef CPU_ONLY"
fi
