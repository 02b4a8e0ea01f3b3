"""The committed gRPC stubs are what scripts/gen_proto.py makes of the .proto, and the
responses the gateway writes on the wire itself are what protobuf would write."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from flowserve.server.protocol import tensors
from flowserve.server.protocol.proto import flowserve_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]


def test_committed_stubs_are_up_to_date(tmp_path):
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    gen_proto = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_proto)
    written = gen_proto.generate(tmp_path)
    assert len(written) == 3
    for fresh in written:
        committed = ROOT / "server" / "protocol" / "proto" / fresh.name
        assert committed.read_text() == fresh.read_text(), f"{committed.name} is stale: run scripts/gen_proto.py"


@pytest.mark.parametrize("shape", [(1, 2), (300, 1, 8, 8), (5, 3)])
@pytest.mark.parametrize("seed", [0, 1, 300, 2**64 - 1])
def test_responses_built_on_the_wire_are_what_protobuf_writes(shape, seed):
    """The gateway writes Sample and LogLikelihood responses itself (tensors.Serialized):
    byte for byte what protobuf would, with and without the optional arrays."""
    rng = np.random.default_rng(seed % 1000)
    samples = rng.standard_normal(shape).astype(np.float32)
    log_prob = rng.standard_normal(shape[0]).astype(np.float32)
    for optional, first_row in ((log_prob, 0), (None, 0), (log_prob, 3 * seed % 2**40 + 1)):
        expected = pb.SampleResponse(samples=pb.Tensor(shape=list(shape), data=samples.tobytes()),
                                     log_prob=[] if optional is None else optional.tolist(), seed=seed,
                                     first_row=first_row)
        built = tensors.sample_response(samples, optional, seed, first_row)
        assert built.data == expected.SerializeToString() and built.rows == shape[0]
        expected.acceptance_rate, expected.draws = 0.3125 + seed % 7, 5 * shape[0] + first_row
        built = tensors.sample_response(samples, optional, seed, first_row, acceptance_rate=expected.acceptance_rate,
                                        draws=expected.draws)
        assert built.data == expected.SerializeToString()
        expected = pb.LogLikelihoodResponse(log_prob=log_prob.tolist(),
                                            bits_per_dim=[] if optional is None else (2 * optional).tolist())
        built = tensors.log_likelihood_response(log_prob, None if optional is None else 2 * optional)
        assert built.data == expected.SerializeToString()
