"""Edge agent: per-gateway input, feature windows, ONNX scoring and a durable outbox (issue 3)."""
