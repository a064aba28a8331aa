"""rtrec: stream."""
