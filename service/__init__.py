"""BentoML inference service: HTTP, gRPC (Open Inference Protocol), batched ONNX graph, Grad-CAM."""
