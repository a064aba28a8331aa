"""rtrec: workers."""
