"""onnxscript rewriter rules, one per module (docstring: the rewrite they make)."""
