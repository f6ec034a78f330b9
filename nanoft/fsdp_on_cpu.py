"""FSDP2 over gloo on CPU: one unit's weights gathered at a time, into one buffer reused by every unit.

    gather_one_unit_at_a_time(model)  # after fully_shard, on CPU (distributed.wrap_model does)

FSDP2's defaults are made for GPUs, where memory held a little longer buys overlap of communication with
compute. On CPU gloo's collectives block the rank that waits for them, so nothing overlaps and whatever is
held beyond the unit being computed is pure cost. Three things were held (a 3B Llama, LoRA, 2 ranks; README,
FSDP):
- Backward prefetch: the next unit's weights gathered while the current one computes (two layers at once).
  Here each unit's prefetch list names only itself, gathered already when its backward starts: no prefetch.
- Each all-gather's output buffer (a whole unit's weights: 0.19 GiB for a 3B layer, 0.28 for its embedding)
  lives until FSDP has copied it out into the unit's parameters, then until the next unit's copy-out (on a
  GPU that overlaps the two), and then until gloo's worker thread lets go of it, tens of ms later.
- gloo's all-gather receives into a flat tensor of its own and copies that into FSDP's buffer: a third copy.
SharedBufferAllGather gives every all-gather the same buffer (the largest unit's size) and fills it with one
in-place broadcast per rank, so at any moment a rank holds that buffer and one unit's gathered weights.
"""

import torch
import torch.distributed as torch_dist
from torch.distributed.fsdp import FSDPModule


def gather_one_unit_at_a_time(model) -> None:
    """No backward prefetch, and one all-gather buffer for all units (see above)."""
    all_gather = SharedBufferAllGather()
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_modules_to_backward_prefetch([module])
            # Older torch (requirements.txt allows it) has no custom all-gather: FSDP2 keeps its own buffers.
            if hasattr(module, "set_custom_all_gather"):
                module.set_custom_all_gather(all_gather)


class SharedBufferAllGather:
    """FSDP2's all-gather (the two methods of its `AllGather` interface) into one buffer that grows to the
    largest unit and is reused by each: FSDP copies the gathered weights out of it before the next all-gather
    starts (no prefetch on CPU), so nothing in it is still needed when it is overwritten."""

    def __init__(self):
        self.buffer = torch.empty(0, dtype=torch.uint8)

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = size[0]
        nbytes = numel * dtype.itemsize
        if self.buffer.numel() < nbytes or self.buffer.device != device:
            self.buffer = torch.empty(0, dtype=torch.uint8)  # the old one goes before the new one is made
            self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return self.buffer[:nbytes].view(dtype)

    def __call__(self, output_tensor, input_tensor, group, async_op: bool = False):
        """Fill output_tensor, whose rank-th chunk FSDP already holds this rank's shard (input_tensor), with
        every rank's chunk: each rank in turn broadcasts its chunk in place. Done on return (no Work)."""
        for source, chunk in enumerate(output_tensor.chunk(group.size())):
            torch_dist.broadcast(chunk, src=torch_dist.get_global_rank(group, source), group=group)
        return None
