"""rtrec: model."""
