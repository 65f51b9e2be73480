"""IR helpers onnx_ir lacks: quantization schemes, graph analysis, export."""
