"""The export bundle: its torch-free format and ONNX Runtime runner (``bundle.format``, all a device
needs), the TorchScript runner, and the export that writes it. Importing this package imports nothing."""
