"""Generated protobuf/gRPC stubs for package splitspec.v1 (regenerate with `make proto`)."""
