"""Pure helpers of the model library: automatic-generation utilities (RLE, boxes,
crops, stability), the resize transform, the ONNX wrapper and export, input checks."""
