"""Tools: real-model export recipes, text corpora, evaluation, benchmarks, viewer."""
