"""Encoding and decoding of media files, shared by every capability: :mod:`.image`, :mod:`.audio`, :mod:`.video`."""
