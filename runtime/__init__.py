"""Running models in ONNX Runtime: sessions, calibration."""
