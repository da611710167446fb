"""Out of PyTorch, verified: checkpoint folders to ONNX (`onnx`) and back to a binary .caffemodel (`caffemodel`).

Both exports check their result before it is written (onnxruntime against the PyTorch module within
the verifier's noise budget; the caffemodel converted back to identical tensors) and record the
source checkpoint's sha256 and the check's figures in a sidecar JSON beside the output.
"""
