"""The HF engine's ``WeightTarget``: a ``torch.nn.Module`` whose synced parameters become views
of the buffers a transport writes into, so a push lands in the parameters themselves.

The first push of a layout (or one after a parameter was moved out of its buffer) allocates
one persistent buffer per bucket on the model's device, copies the parameters in and makes
each parameter's ``.data`` a view of its slice; later pushes are received straight into them,
with no unpacking copy and no allocation. Over shared memory the parameters become views of
the sender's slot instead (``adopt``): no copy at all. What the target keeps between pushes
lives on the target, never on the module.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rlhf_dist.weight_sync.base import WeightTarget
from rlhf_dist.weight_sync.layout import ParamSpec, check_manifest, checksum, plan_buckets


class ModuleWeights(WeightTarget):
    def __init__(self, model: nn.Module):
        self.model = model
        self.held: tuple | None = None  # (layout key, parameter addresses, buffers)

    def _params(self, manifest: list[ParamSpec]) -> dict[str, Tensor]:
        params = dict(self.model.named_parameters())
        check_manifest(params, manifest)
        return params

    @torch.no_grad()
    def buffers(self, manifest: list[ParamSpec], bucket_bytes: int) -> list[Tensor]:
        params = self._params(manifest)
        ptrs = [params[s.name].data_ptr() for s in manifest]
        key = (tuple(manifest), bucket_bytes)
        if self.held is not None and self.held[0] == key and self.held[1] == ptrs:
            return self.held[2]
        buffers = []
        for bucket in plan_buckets(manifest, bucket_bytes):
            ps = [params[s.name] for s in bucket.specs]
            flat = torch.zeros(bucket.nbytes, dtype=torch.uint8, device=ps[0].device)
            for p, view in zip(ps, bucket.views(flat)):
                view.copy_(p.data)
                p.data = view  # a tied Parameter is one object: every module sees the view
            buffers.append(flat)
        ptrs = [params[s.name].data_ptr() for s in manifest]
        self.held = (key, ptrs, buffers)
        return buffers

    def loaded(self, manifest: list[ParamSpec], bucket_bytes: int) -> None:
        """Nothing to do: the buffers are the parameters."""

    @torch.no_grad()
    def adopt(self, manifest: list[ParamSpec], regions: list[Tensor], bucket_bytes: int) -> bool:
        params = self._params(manifest)
        fresh = False
        for bucket, region in zip(plan_buckets(manifest, bucket_bytes), regions):
            for spec, view in zip(bucket.specs, bucket.views(region)):
                p = params[spec.name]
                if p.data_ptr() != view.data_ptr():
                    p.data = view  # a tied Parameter is one object: every module sees the view
                    fresh = True
        return fresh

    def checksum(self, manifest: list[ParamSpec]) -> str:
        params = self._params(manifest)
        return checksum(params[s.name] for s in manifest)
