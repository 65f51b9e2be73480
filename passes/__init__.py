"""Graph passes (one per file) and the declared pipelines."""
