"""The base of modules that hold quantized state in buffers: a move follows the device, never casts the dtype."""

from __future__ import annotations

from torch import nn


class QuantizedBuffers(nn.Module):
    """``model.to(bf16)`` / ``.half()`` must move packed codes and fp32 scales, never round or reinterpret them."""

    def _apply(self, fn, recurse=True):
        before = {name: buf for name, buf in self._buffers.items() if buf is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self
