"""Flow library, training, ONNX export and Triton repository writer."""
