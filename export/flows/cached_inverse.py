"""The inverse of a MADE affine layer that computes every hidden unit once (large batches).

:class:`~.transforms.FixedPointInverse` runs whole network passes until nothing changes.
A MADE allows less work: a unit depends only on the inputs up to its *reach* (the highest
input feature it sees through the masks), so it can be computed once, right after that
feature is found, and each feature's shift and log-scale as soon as the units it reads are
(the caching behind fast WaveNet generation, Ramachandran et al., 2017).

ONNX Runtime runs small operations with a fixed cost of a few microseconds, so the steps
are grouped: features go in blocks of ``block``. Within a block, one step per feature adds
the new values to small per-block accumulators; at the end of a block, one matrix product
per layer adds the block's values to the pre-activations of every later unit. Values lie
features (or units) first and batch second, so that a step's rows are contiguous.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn
from torch._higher_order_ops import while_loop

from .nets import MADE, MaskedLinear
from .transforms import soft_clamp


def reaches(masks: list[Tensor], features: int) -> list[Tensor]:
    """For each layer of masked linears, the highest input feature each output depends on
    (-1 for none)."""
    reach = torch.arange(features)
    result = []
    for mask in masks:
        reach = torch.where(mask.bool(), reach[None, :], -1).amax(1)
        result.append(reach)
    return result


def slot_table(reach: Tensor, padded_features: int, dummy: int) -> Tensor:
    """``[padded_features, B]``: the units of each reach, padded with ``dummy`` to the
    largest count ``B``; units that see no input count as reach 0."""
    reach = reach.clamp(min=0)
    counts = torch.bincount(reach, minlength=padded_features)
    order = torch.argsort(reach, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(len(reach)) - starts[reach[order]]
    table = torch.full((padded_features, int(counts.max())), dummy)
    table[reach[order], position] = order
    return table


class CachedMADEInverse(nn.Module):
    """Inverts ``z = (x - shift(x)) * exp(-log_scale(x))``, where ``made(x)`` returns
    ``(shift, raw_log_scale)`` and ``log_scale = soft_clamp(raw_log_scale, bound)``.

    Computes what :class:`~.transforms.FixedPointInverse` computes for the same MADE, up to
    float32 rounding (the sums run in another order). Built from the MADE's current
    weights: rebuild it after training. ``block`` features per block (default 8 up to 128
    features, else 16). ``min_batch`` is the batch size from which the exported graph
    prefers it to the fixed-point loop.
    """

    def __init__(self, made: MADE, log_scale_bound: float, block: int | None = None, min_batch: int = 256):
        super().__init__()
        linears = [made.first, *(m for m in made.rest if isinstance(m, MaskedLinear))]
        self.activation = next(m for m in made.rest if not isinstance(m, MaskedLinear))
        self.context_layer = made.context_layer
        features = linears[0].in_features
        if linears[-1].out_features != 2 * features:
            raise ValueError("the MADE must return a shift and a log-scale per feature")
        # Each block ends with products over every unit; longer blocks mean fewer of them but
        # larger per-step accumulators. Fastest on the 2-core machine: 8 at D=64, 16 at D=256.
        block = block or (8 if features <= 128 else 16)
        self.features, self.block, self.min_batch = features, block, min_batch
        self.blocks = math.ceil(features / block)
        self.log_scale_bound = log_scale_bound
        padded = self.blocks * block
        feature = torch.arange(padded)
        in_use = feature < features
        *hidden, outputs = reaches([linear.mask for linear in linears], features)
        # Output i is read at the start of step i: it must depend on features before i only.
        if not bool((outputs.reshape(2, features) < torch.arange(features)).all()):
            raise ValueError("the MADE is not autoregressive: an output sees its own feature")
        slots = [torch.where(in_use, feature, features)[:, None]]  # inputs: one feature per step
        slots += [slot_table(reach, padded, len(reach)) for reach in hidden]
        slots.append(torch.stack([torch.where(in_use, feature, 2 * features),
                                  torch.where(in_use, feature + features, 2 * features)], 1))
        self.widths = [table.shape[1] for table in slots[1:-1]]  # slots per step, hidden layers
        for index, linear in enumerate(linears):
            # Row and column ``-1`` of ``weight`` and ``bias`` stand in for padding slots.
            weight = nn.functional.pad((linear.weight * linear.mask).detach(), (0, 1, 0, 1))
            sources = slots[index].reshape(self.blocks, -1)
            targets = slots[index + 1].reshape(self.blocks, -1)
            self.register_buffer(f"bias{index}", nn.functional.pad(linear.bias.detach(), (0, 1)))
            self.register_buffer(f"rows{index}", targets)  # accumulator rows of each block
            self.register_buffer(f"within{index}", torch.stack(  # a block's sources -> its targets
                [weight[t][:, s] for s, t in zip(sources, targets, strict=True)]))
            self.register_buffer(f"onward{index}", torch.stack(  # a block's sources -> every target
                [weight[:, s] for s in sources]))

    def _tables(self, name: str) -> list[Tensor]:
        return [getattr(self, f"{name}{index}") for index in range(len(self.widths) + 1)]

    def _block(self, index: Tensor, noise: Tensor, totals: list[Tensor], found: Tensor,
               log_det: Tensor) -> tuple[Tensor, list[Tensor], Tensor, Tensor]:
        """Features ``index * block`` onwards: ``totals`` are every layer's pre-activations
        ``[units + 1, B]`` so far, ``found`` the features found ``[blocks, block, B]``."""
        at = index.reshape(1)

        def pick(table: Tensor) -> Tensor:  # this block's entry of a per-block table
            return torch.index_select(table, 0, at)[0]

        running = [torch.index_select(total, 0, pick(rows)) for total, rows in zip(totals, self._tables("rows"))]
        within = [pick(table) for table in self._tables("within")]
        noise = pick(noise)
        layers = len(self.widths)
        values: list[list[Tensor]] = [[] for _ in range(layers + 1)]  # per layer input, one per step
        log_scales = []
        for step in range(self.block):
            shift, raw = running[layers][2 * step:2 * step + 1], running[layers][2 * step + 1:2 * step + 2]
            log_scale = soft_clamp(raw, self.log_scale_bound)
            x = noise[step:step + 1] * torch.exp(log_scale) + shift
            log_scales.append(log_scale)
            values[0].append(x)
            running[0] = torch.addmm(running[0], within[0][:, step:step + 1], x)
            for layer, width in enumerate(self.widths):
                units = slice(step * width, (step + 1) * width)  # the units of this step's reach
                h = self.activation(running[layer][units])
                values[layer + 1].append(h)
                if layer + 1 < layers or step + 1 < self.block:  # the last step's outputs: later blocks'
                    running[layer + 1] = torch.addmm(running[layer + 1], within[layer + 1][:, units], h)
        inputs = [torch.cat(rows, 0) for rows in values]
        totals = [torch.addmm(total, pick(onward), block)
                  for total, onward, block in zip(totals, self._tables("onward"), inputs, strict=True)]
        found = torch.cat([found[1:], inputs[0][None]], 0)
        return index + 1, totals, found, log_det + torch.cat(log_scales, 0).sum(0)

    def forward(self, z: Tensor, context: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """``(x, log|det dx/dz|)`` for ``z`` ``[B, D]``."""
        batch = z.shape[0]
        noise = nn.functional.pad(z, (0, self.blocks * self.block - self.features)).T
        noise = noise.reshape(self.blocks, self.block, batch).contiguous()
        totals = [bias[:, None].expand(-1, batch).contiguous() for bias in self._tables("bias")]
        if self.context_layer is not None and context is not None:
            totals[0] = totals[0] + nn.functional.pad(self.context_layer(context), (0, 1)).T
        found = torch.zeros(self.blocks, self.block, batch, dtype=z.dtype)
        log_det = torch.zeros(batch, dtype=z.dtype)
        index = torch.zeros((), dtype=torch.int64)
        if torch.compiler.is_compiling():
            def unfinished(index, found, log_det, *totals):
                return index < self.blocks

            def body(index, found, log_det, *totals):
                index, totals, found, log_det = self._block(index, noise, list(totals), found, log_det)
                return index, found, log_det, *totals

            _, found, log_det, *_ = while_loop(unfinished, body, (index, found, log_det, *totals))
        else:
            for _ in range(self.blocks):
                index, totals, found, log_det = self._block(index, noise, totals, found, log_det)
        return found.reshape(-1, batch)[:self.features].T.contiguous(), log_det
