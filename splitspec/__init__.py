"""splitspec: speculative decoding split into gRPC microservices (shared core)."""

__version__ = "0.1.0"
