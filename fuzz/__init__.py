"""Fuzz harness: mutated Caffe files, reference activations and checkpoint folders through the real entry points.

Each case replaces one or two files of a valid seed (made from the project's synthetic nets) by
mutated bytes, runs the entry point that reads them in a worker process with a time and memory
limit, and is classified as accepted, a clean error (exit 2, one line naming an input file,
nothing left at the output path) or a crash (anything else). `python -m fuzz --help`.
"""
