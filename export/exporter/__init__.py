"""Export: the two directions as graphs (``graphs``), written as ONNX or TorchScript
(``formats``), checked against PyTorch (``parity``), with Triton configs
(``triton_config``); ``pipeline.export_model`` runs them all into a model repository, for
any servable model, and ``pipeline.export_flow`` for a checkpoint of ``flowserve train``."""
