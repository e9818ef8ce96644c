"""Open Inference Protocol (KServe v2): protocol-neutral models, tensor codecs, gRPC servicer, REST app."""
