"""Data: the video token layout (segments, captions, token orders)."""
