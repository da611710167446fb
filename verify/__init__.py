"""Layer-by-layer parity between a converted checkpoint and a Caffe reference-activations file."""
