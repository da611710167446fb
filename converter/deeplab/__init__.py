"""The DeepLab-v2 mapping: Caffe naming, conversion to the models/ state dict, head surgery, the earlier port's layout."""
