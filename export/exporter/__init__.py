"""Export: the two directions as graphs (``graphs``), written as ONNX or TorchScript
(``formats``), checked against PyTorch (``parity``), with Triton configs
(``triton_config``); ``pipeline.export_flow`` runs them all into a model repository."""
