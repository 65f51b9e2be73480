"""Custom-op kernels and their NumPy references."""
