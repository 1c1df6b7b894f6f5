"""Policy serving: model loading, the batching engine, gRPC and OpenAI-compatible HTTP faces."""
