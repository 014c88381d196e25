"""The music service: ACE-Step 1.5 text-to-music, covers and repaints over gRPC (``kiln.music.v1``)."""
