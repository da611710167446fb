"""Read Caffe nets (schema, binary, text, HDF5) and convert them to PyTorch state dicts."""
