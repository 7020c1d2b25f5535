"""What the training and synthesis stages share to run on one process or many.

accelerate owns the processes: `accelerate launch` or `torchrun` starts N of them (DDP on N
GPUs, or MULTI_CPU over gloo), and one plain process is the same code with N = 1. The
rules these pieces keep:

- The training step calls the module that `accelerator.prepare` returned. DDP averages the
  gradients only in a backward pass whose forward went through its wrapper; a call to the
  bare model trains each rank on its own and they drift apart. `Objective` puts a model and
  its loss into one module, so the whole step is that forward.
- Each step draws its global batch (N times the per-process batch) from the step's own
  generator, and each rank keeps its slice (`local`). The ranks see different images, and
  N processes at a per-process batch B follow one process at batch N x B.
- Only the main process logs to MLflow and writes outputs and checkpoints; `in_sync`
  checks at the end that every rank holds the same weights.
"""

from __future__ import annotations

import hashlib

import torch


class DistributedError(RuntimeError):
    """The processes disagree (their weights drifted apart)."""


def update(accelerator, loss: torch.Tensor, optimizer, schedule) -> float:
    """One training step after the forward: backward (where DDP averages the gradients, and
    accelerate scales fp16 ones), the optimizer and schedule steps, the gradients cleared.
    Returns the loss as a number."""
    accelerator.backward(loss)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad()
    return loss.item()


def accelerator(mixed_precision: str, grad_accum: int = 1):
    """accelerate's Accelerator for a training stage: the accelerator's device when there is
    one; without, the CPU, and a run launched on N processes is MULTI_CPU over gloo
    (accelerate takes a plain `torchrun` on a CPU-only machine for one process unless
    told `cpu`)."""
    from accelerate import Accelerator

    return Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accum,
                       cpu=not torch.accelerator.is_available())


def processes():
    """accelerate's PartialState (rank, world, device) for a stage that only infers."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.accelerator.is_available())


class Objective(torch.nn.Module):
    """A model and its loss as one module: `forward(*args)` is `loss_fn(model, *args)`.

    Prepare this (not the bare model) with accelerate and call it in the training step, so
    DDP's forward sees the whole step and synchronises the gradients."""

    def __init__(self, model: torch.nn.Module, loss_fn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, *args):
        return self.loss_fn(self.model, *args)


def local(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous slice of a global batch (its first dimension)."""
    if world == 1:
        return batch
    size = len(batch) // world
    return batch[rank * size : (rank + 1) * size]


def digest(model: torch.nn.Module) -> str:
    """sha256 of the trainable weights, in name order."""
    sha = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            sha.update(name.encode())
            sha.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()


def in_sync(accelerator, model: torch.nn.Module, what: str) -> str:
    """Raise DistributedError unless every rank holds the same trainable weights; returns
    their digest. The main process prints one line saying so."""
    from accelerate.utils import gather_object

    mine = digest(model)
    every = gather_object([mine]) if accelerator.num_processes > 1 else [mine]
    if len(set(every)) > 1:
        raise DistributedError(f"{what}: the {len(every)} processes hold different weights "
                               f"({', '.join(d[:12] for d in every)}); gradients were not "
                               "synchronised")
    if accelerator.is_main_process:
        print(f"{what}: weights identical on {len(every)} process"
              f"{'es' if len(every) > 1 else ''} (sha256 {mine[:16]})", flush=True)
    return mine
