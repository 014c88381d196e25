"""Kiln's gRPC services: shared server code in `common`, one package per capability."""
