"""Caffe's file formats: schema, binary wire codec, prototxt, caffemodel, HDF5, V1 upgrade, the net description."""
