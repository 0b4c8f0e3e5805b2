"""Command-line tools apart from the library: ``python -m sam_core.tools.bench`` and
``python -m sam_core.tools.export_onnx``."""
