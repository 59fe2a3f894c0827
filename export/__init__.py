"""The export stage (installed as ``swssl.export``): ONNX, TensorRT and AOTInductor artifacts."""
