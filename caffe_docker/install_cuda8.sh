#!/bin/sh
# Install the CUDA 8.0 toolkit pieces the deeplab-v2 fork links against (nvcc,
# cudart, cuBLAS, cuRAND) on Ubuntu 16.04, from NVIDIA's ubuntu1604 apt
# repository. These are the packages the nvidia/cuda:8.0-devel-ubuntu16.04 image
# carried; NVIDIA deleted the CUDA 8.0 tags from Docker Hub in 2023 (end-of-life
# policy), so the image is rebuilt from its parts on ubuntu:16.04.
# The GPU driver comes from the host at run time (docker run --gpus all).
set -eu
repo=https://developer.download.nvidia.com/compute/cuda/repos/ubuntu1604/x86_64

apt-get update
apt-get install -y --no-install-recommends ca-certificates curl gnupg
# 3bf863cc is the key NVIDIA signs its CUDA repositories with since April 2022.
curl -fsSL "$repo/3bf863cc.pub" | apt-key add -
echo "deb $repo /" > /etc/apt/sources.list.d/cuda.list
apt-get update
apt-get install -y --no-install-recommends \
    cuda-core-8-0 \
    cuda-misc-headers-8-0 \
    cuda-driver-dev-8-0 \
    cuda-cudart-dev-8-0 \
    cuda-cublas-dev-8-0 \
    cuda-curand-dev-8-0
rm -rf /var/lib/apt/lists/*

ln -sfn /usr/local/cuda-8.0 /usr/local/cuda
echo /usr/local/cuda/lib64 > /etc/ld.so.conf.d/cuda.conf
ldconfig
/usr/local/cuda/bin/nvcc --version
