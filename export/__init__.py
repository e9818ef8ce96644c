"""Turn a training run into one validated ONNX inference graph, versioned in the BentoML model store."""
