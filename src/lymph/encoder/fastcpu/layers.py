"""Layers of the autoencoder that compute the same thing as PyTorch's, faster on the CPU.

Measured on this project's 2-core CPU (bf16 autocast, channels-last, batch 128, 112 px;
``docs/benchmarks.md``), each removes time that PyTorch's eager CPU path spends outside
the arithmetic:

- :class:`ConvTranspose2d` is ``torch.nn.ConvTranspose2d`` (same parameters, state-dict
  keys and outputs) whose backward pass computes the weight gradient as the weight
  gradient of the *strided convolution* from the output gradient back to the input. The
  two are the same sum, term for term: a transposed convolution adds
  ``w[ci, co, k] x[p, ci]`` into output ``s p - pad + k``, so its weight gradient is
  ``sum_p x[p, ci] g[s p - pad + k, co]``, which is the weight gradient of the convolution
  ``g -> x`` with the same stride, padding and weight tensor. oneDNN computes the
  convolution's 2.6 to 3.9x faster than the transposed convolution's for the decoder's
  three layers, and the results are bit-identical. The input gradient is the strided
  convolution of the output gradient, as PyTorch computes it too.
- :func:`run_sequential` runs an ``nn.Sequential`` with each convolution that is followed
  by a ReLU computed as one oneDNN primitive with the ReLU fused (bit-identical output;
  1.4x faster forward for these layers, as the activation is written once instead of
  written, read and written again). The backward is PyTorch's ReLU and convolution
  gradients. Used for channels-last fp32 or bf16 inputs on the CPU, ungrouped and undilated
  layers.
- :func:`mse_loss` and :func:`normalise_channels`: the whole-image passes of the loss and
  the input normalisation, in fewer and vectorised passes (their docs).

Outside these conditions (another device, layout or geometry) PyTorch's own path runs.
Each fast path can be switched off in :data:`FAST` (``LYMPH_FAST_LAYERS=0`` switches
them all off, e.g. to rule them out when something looks wrong); the stage-one ablation
benchmark (:func:`lymph.encoder.bench.bench_step_ablation`) switches them one at a time.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_ON = os.environ.get("LYMPH_FAST_LAYERS", "1") != "0"
# which fast paths are used (the channels-last linear layers are in lymph.encoder.model)
FAST: dict[str, bool] = {"transposed_conv_grad": _ON, "conv_relu": _ON, "mse": _ON,
                         "normalise": _ON, "channels_last_linear": _ON}

_MKLDNN = torch.ops.mkldnn


def _has_fused_ops() -> bool:
    try:  # oneDNN's fused convolution ops (PyTorch-internal: checked, not assumed)
        return bool(_MKLDNN._convolution_pointwise and _MKLDNN._convolution_transpose_pointwise)
    except (AttributeError, RuntimeError):
        return False


def _has_bf16_convolution() -> bool:
    """Whether oneDNN computes bf16 convolutions on this CPU (AVX-512 BW/VL/DQ or
    AVX-NE-CONVERT); elsewhere its fused op raises, while PyTorch's own convolution still
    runs bf16 autocast (slower, emulated), so the fused path is skipped for bf16."""
    try:
        return bool(_MKLDNN._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


_FUSED_OPS = torch.backends.mkldnn.is_available() and _has_fused_ops()
_FUSED_BF16 = _FUSED_OPS and _has_bf16_convolution()


def _autocast_operands(x: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Cast to the autocast dtype as autocast does for convolutions (differentiably)."""
    dev = x.device.type
    if not torch.is_autocast_enabled(dev):
        return x, weight, bias
    dt = torch.get_autocast_dtype(dev)
    return x.to(dt), weight.to(dt), (bias.to(dt) if bias is not None else None)


def _transposed_conv_grads(ctx: Any, x: torch.Tensor, weight: torch.Tensor,
                           grad: torch.Tensor) -> tuple[Any, Any, Any]:
    """Input, weight and bias gradients of a transposed convolution, as convolutions."""
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = F.conv2d(grad, weight, None, ctx.stride, ctx.padding)
    if ctx.needs_input_grad[1]:
        # the convolution grad -> x: its "output gradient" is x, its "input" is grad
        grad_w = torch.ops.aten.convolution_backward(
            x, grad, weight, None, list(ctx.stride), list(ctx.padding), [1, 1], False,
            [0, 0], 1, [False, True, False])[1]
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = grad.sum((0, 2, 3))
    return grad_x, grad_w, grad_b


class _ConvTransposeConvGrad(torch.autograd.Function):
    """``conv_transpose2d`` with its backward written as convolutions."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                stride: tuple[int, int], padding: tuple[int, int],
                output_padding: tuple[int, int]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.has_bias = stride, padding, bias is not None
        return F.conv_transpose2d(x, weight, bias, stride, padding, output_padding)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        x, weight = ctx.saved_tensors
        return *_transposed_conv_grads(ctx, x, weight, grad), None, None, None


class ConvTranspose2d(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` with a faster backward on the CPU (see the module doc).

    Under autocast the input, weight and bias are cast to the autocast dtype first, as
    autocast does for ``conv_transpose2d``.
    """

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if output_size is not None or not self._conv_grad_applies(x):
            return super().forward(x, output_size)
        x, weight, bias = _autocast_operands(x, self.weight, self.bias)
        with torch.autocast(x.device.type, enabled=False):
            return _ConvTransposeConvGrad.apply(x, weight, bias, self.stride, self.padding,
                                                self.output_padding)

    def _conv_grad_applies(self, x: torch.Tensor) -> bool:
        # The strided convolution of the output always lands on the input's shape: the
        # output side is (n - 1) s - 2p + k + op, and the convolution of it gives
        # n + floor(op / s) = n, as PyTorch requires output_padding < stride.
        if not FAST["transposed_conv_grad"] or x.device.type != "cpu" or x.ndim != 4:
            return False
        if self.groups != 1 or self.dilation != (1, 1):
            return False
        return torch.is_grad_enabled()  # inference: nothing to gain


class _ConvReLU(torch.autograd.Function):
    """``relu(conv(x))`` or ``relu(conv_transpose(x))`` as one oneDNN primitive."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                conv: nn.Module) -> torch.Tensor:
        stride, padding, dilation = list(conv.stride), list(conv.padding), list(conv.dilation)
        if isinstance(conv, nn.ConvTranspose2d):
            y = _MKLDNN._convolution_transpose_pointwise(
                x, weight, bias, padding, list(conv.output_padding), stride, dilation,
                conv.groups, "relu", [None], "")
        else:
            y = _MKLDNN._convolution_pointwise(x, weight, bias, padding, stride, dilation,
                                               conv.groups, "relu", [None], "")
        ctx.save_for_backward(x, weight, y)
        ctx.stride, ctx.padding, ctx.dilation = conv.stride, conv.padding, conv.dilation
        ctx.transposed = isinstance(conv, nn.ConvTranspose2d)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        x, weight, y = ctx.saved_tensors
        grad = torch.ops.aten.threshold_backward(grad, y, 0)
        if ctx.transposed:
            return *_transposed_conv_grads(ctx, x, weight, grad), None
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                ctx.has_bias and ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad, x, weight, [weight.shape[0]] if ctx.has_bias else None, list(ctx.stride),
            list(ctx.padding), list(ctx.dilation), False, [0, 0], 1, mask)
        return gx, gw, gb if mask[2] else None, None


def _fuses_relu(conv: nn.Module, x: torch.Tensor) -> bool:
    if not FAST["conv_relu"] or type(conv) not in (nn.Conv2d, ConvTranspose2d,
                                                    nn.ConvTranspose2d):
        return False
    if x.device.type != "cpu" or x.ndim != 4 or conv.groups != 1 or conv.dilation != (1, 1):
        return False  # (the transposed backward assumes no dilation, as ConvTranspose2d's)
    if getattr(conv, "padding_mode", "zeros") != "zeros" or isinstance(conv.padding, str):
        return False
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    if dtype not in (torch.float32, torch.bfloat16) or (dtype == torch.bfloat16
                                                        and not _FUSED_BF16):
        return False  # bf16 on a CPU without oneDNN bf16 (AVX2 only): PyTorch's path
    return (_FUSED_OPS and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last))


def run_sequential(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``layers(x)``, with every convolution followed by a ReLU run as one fused primitive
    where it applies (see the module doc); the modules, and so the state dict, are
    unchanged."""
    mods = list(layers)
    i = 0
    while i < len(mods):
        conv = mods[i]
        if i + 1 < len(mods) and isinstance(mods[i + 1], nn.ReLU) and _fuses_relu(conv, x):
            x, weight, bias = _autocast_operands(x, conv.weight, conv.bias)
            with torch.autocast("cpu", enabled=False):
                x = _ConvReLU.apply(x, weight, bias, conv)
            i += 2
        else:
            x = conv(x)
            i += 1
    return x


# ---- the loss and the input normalisation -------------------------------------------------
def _flat(t: torch.Tensor) -> torch.Tensor | None:
    """A 1-D view of a contiguous or channels-last 4-D tensor's memory, else None."""
    if t.is_contiguous():
        return t.view(-1)
    if t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(-1)  # a view: no copy
    return None


class _MSELoss(torch.autograd.Function):
    """``mean((recon - target) ** 2)``, ``target`` constant (see :func:`mse_loss`)."""

    @staticmethod
    def forward(ctx: Any, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        diff = recon.to(torch.float32, copy=True).sub_(target)  # keeps recon's layout
        flat = _flat(diff)
        sq = torch.dot(flat, flat) if flat is not None else diff.square().sum()
        ctx.save_for_backward(diff)
        ctx.dtype = recon.dtype
        return sq / diff.numel()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        (diff,) = ctx.saved_tensors
        return diff.mul(grad * (2.0 / diff.numel())).to(ctx.dtype), None


def mse_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error in fp32 between ``recon`` (any float dtype, e.g. the bf16 output
    of an autocast decoder) and a constant fp32 ``target`` of the same layout.

    Same value as ``F.mse_loss(recon.float(), target)`` up to summation order, and the
    same gradient (returned in ``recon``'s dtype and layout), in two passes over the images
    instead of ATen's six (a cast, the loss, a zero-filled gradient, its backward and the
    cast back; with channels-last inputs its gradient also came back in the other layout):
    about 3 instead of 12 ms per batch of 128 at 112 px on this CPU.
    """
    if target.requires_grad:
        raise ValueError("mse_loss: the target must not require a gradient")
    if recon.shape != target.shape:
        raise ValueError(f"mse_loss: shapes differ, {tuple(recon.shape)} vs {tuple(target.shape)}")
    if not FAST["mse"]:
        return F.mse_loss(recon.float(), target)
    return _MSELoss.apply(recon, target)


def normalise_channels(pixels: torch.Tensor, scale: torch.Tensor,
                       shift: torch.Tensor) -> torch.Tensor:
    """``pixels.float() * scale - shift`` per channel, ``pixels`` ``(B, C, H, W)`` (uint8),
    ``scale`` and ``shift`` ``(C,)`` float32; the result keeps ``pixels``' layout.

    In channels-last memory the channel is the innermost dimension (3 values), so a
    broadcast ``(1, C, 1, 1)`` operand leaves nothing to vectorise: 4 ms per batch of 128
    at 112 px. Here the memory is viewed as rows of ``k`` whole pixels and the operands are
    tiled to one such row, so each row is one vector operation: 1 ms. Same arithmetic (a
    multiply, then a subtract, in fp32), bit-identical results.
    """
    x = pixels.to(torch.float32, copy=True)
    c = x.shape[1]
    flat = _flat(x) if FAST["normalise"] and x.ndim == 4 and not x.is_contiguous() else None
    if flat is None:  # NCHW (or other) layout: the plain broadcast vectorises along W
        return x.mul_(scale.view(1, c, 1, 1)).sub_(shift.view(1, c, 1, 1))
    pixels_per_row = next(k for k in (32, 16, 8, 4, 2, 1) if (flat.numel() // c) % k == 0)
    rows = flat.view(-1, c * pixels_per_row)
    rows.mul_(scale.repeat(pixels_per_row)).sub_(shift.repeat(pixels_per_row))
    return x
