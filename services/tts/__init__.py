"""The tts service: speech synthesis (Piper) streamed over gRPC."""
