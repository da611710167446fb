"""PyTorch models that reproduce Caffe nets exactly (DeepLab-v2 ResNet-101 multi-scale)."""
