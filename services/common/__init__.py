"""Code every Kiln service shares: errors, settings, the model registry, the gRPC bootstrap."""
