"""A Triton Python model that moves tensors as flowserve's runner did before it used DLPack:
``as_numpy()`` in, ``pb_utils.Tensor(name, ndarray)`` out. Its three outputs show each half
apart, for one input ``x``:

- ``numpy_both_ways``: ``x`` read with ``as_numpy()`` and sent with ``Tensor(name, ndarray)``;
- ``numpy_in``: ``x`` read with ``as_numpy()``, sent through DLPack;
- ``numpy_out``: ``x`` read through DLPack, sent with ``Tensor(name, ndarray)``.

DLPack goes through torch: the stub renames the capsules it consumes in a way numpy's
destructor does not accept (see the runner), and torch's does.
"""

import numpy as np
import torch
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            tensor = pb_utils.get_input_tensor_by_name(request, "x")
            read_by_numpy = np.ascontiguousarray(tensor.as_numpy())
            read_by_dlpack = torch.from_dlpack(tensor).clone()
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("numpy_both_ways", read_by_numpy),
                pb_utils.Tensor.from_dlpack("numpy_in", torch.from_numpy(read_by_numpy.copy())),
                pb_utils.Tensor("numpy_out", read_by_dlpack.numpy()),
            ]))
        return responses
