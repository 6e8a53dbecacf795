"""The few collective operations the methods need; every one is a no-op on a single process."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist

_local_world = 0  # the real world size inside local_collectives(), else 0


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and not _local_world


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for the local slice.

    Written by hand (not ``torch.distributed.nn.all_gather``) because its backward needs
    reduce-scatter or all-to-all, which not every backend has; all_reduce works everywhere.
    With a loss computed on the gathered tensor on every rank and DDP averaging parameter
    gradients, the result equals the single-process gradient on the global batch.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.n = x.shape[0]
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        r = dist.get_rank()
        return grad[r * ctx.n : (r + 1) * ctx.n]


@contextmanager
def local_collectives():
    """Run code on this rank alone: every helper here acts as if it were the only process, except
    that the gathers return ``world`` copies of the local tensor, so a training step keeps the
    shapes and memory of the real one.

    For the auto-batch trial step: a rank that runs out of memory leaves the step at its own point,
    and with real collectives the others would wait in a gather it never joins (a hang until the
    process-group timeout, or mismatched data). Run all of the step (backward too) inside.
    """
    global _local_world
    outer = _local_world
    _local_world = outer or world_size()
    try:
        yield
    finally:
        _local_world = outer


def _local_copies(x: torch.Tensor) -> torch.Tensor:
    return x.repeat(_local_world, *[1] * (x.dim() - 1))


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0 (rank order), differentiable."""
    if _local_world > 1:
        return _local_copies(x)
    return _GatherWithGrad.apply(x) if world_size() > 1 else x


@torch.no_grad()
def gather_nograd(x: torch.Tensor) -> torch.Tensor:
    if _local_world > 1:
        return _local_copies(x)
    if world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, 0)


@torch.no_grad()
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / world_size()


@torch.no_grad()
def gather_varlen(x: torch.Tensor) -> torch.Tensor:
    """all_gather for tensors whose first dim differs across ranks (eval shards)."""
    if world_size() == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    m = int(max(int(s) for s in sizes))
    pad = torch.zeros((m - x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    out = [torch.empty((m,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device) for _ in sizes]
    dist.all_gather(out, torch.cat([x, pad]))
    return torch.cat([o[: int(s)] for o, s in zip(out, sizes)])


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch on any backend (gloo/CPU included).

    torch's SyncBatchNorm only runs on accelerators; CPU workers would otherwise normalise with
    per-rank statistics, which changes the method (SimCLR's global BN) and breaks "DDP equals one
    process". Sums of x and x^2 are all-reduced with gradients; on CUDA torch's kernel is used instead.
    """

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        xf = x.float()
        count = torch.tensor([float(x.numel() // x.shape[1])], device=x.device)
        stats = torch.cat([xf.sum(dims), (xf * xf).sum(dims), count])
        stats = _AllReduceSum.apply(stats)
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp_min(1), alpha=m)
                self.num_batches_tracked += 1
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_global_bn(module: torch.nn.Module, device_type: str) -> torch.nn.Module:
    """Every BatchNorm -> a global-batch BatchNorm: torch's SyncBatchNorm on CUDA, ours elsewhere."""
    if device_type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    out = module
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        out = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            with torch.no_grad():
                out.weight.copy_(module.weight)
                out.bias.copy_(module.bias)
            # Keep frozen BNs frozen (EMA teachers): a fresh requires-grad parameter that never gets a
            # gradient leaves its DDP bucket unreduced and DDP fails on the next step.
            out.weight.requires_grad_(module.weight.requires_grad)
            out.bias.requires_grad_(module.bias.requires_grad)
        if module.track_running_stats:
            out.running_mean.copy_(module.running_mean)
            out.running_var.copy_(module.running_var)
            out.num_batches_tracked.copy_(module.num_batches_tracked)
    for name, child in module.named_children():
        out.add_module(name, convert_global_bn(child, device_type))
    return out


@torch.no_grad()
def broadcast_parameters(module: torch.nn.Module, src: int = 0) -> None:
    """Start every rank from rank 0's weights and buffers."""
    if world_size() == 1:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src)


@torch.no_grad()
def all_reduce_gradients(module: torch.nn.Module) -> None:
    """Average gradients over ranks in one flat all_reduce, after backward has finished."""
    if world_size() == 1:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def data_parallel(model: torch.nn.Module, device: torch.device):
    """``(net, sync)``: call ``net(views)``, then ``loss.backward()``, then ``sync()``.

    On CUDA this is torch's DDP (NCCL, gradient all-reduce overlapped with backward, torch's
    SyncBatchNorm). On CPU/gloo the gradients are averaged in one all_reduce after backward:
    there the methods' own collectives inside backward (GlobalBatchNorm, gather_with_grad) share
    the process group with DDP's asynchronous bucket all-reduces, and in a Ray worker that mix
    was seen to produce wrong gradients, while a post-backward all-reduce matched one process.
    """
    if world_size() == 1:
        return model, lambda: None
    if device.type == "cuda":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index]), lambda: None
    broadcast_parameters(model)
    return model, lambda: all_reduce_gradients(model)
