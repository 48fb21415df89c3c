"""Deployment: ONNX export (torch side) and the bundle, predictor and server (no torch)."""
