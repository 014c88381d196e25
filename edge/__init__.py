"""Kiln's HTTP edge: the public REST API in front of the gRPC mesh."""
