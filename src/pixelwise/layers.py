"""Small building blocks shared by the models: bilinear upsampling, conv blocks, unpooling, and
the unpool + conv decoder stage of SegNet and DeconvNet.

Pure functions carry their tensor shapes in the docstring; modules exist only where there is
state (a learnable or frozen upsampling kernel, a decoder stage's convs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "UPSAMPLE_MODES",
    "BilinearUpsample",
    "DecoderStage",
    "bilinear_kernel",
    "conv_bn",
    "conv_bn_relu",
    "conv_relu",
    "decoder_stages",
    "max_unpool",
    "unpools_by_index",
    "unpool",
    "upsample_nearest",
    "upsample_zeros",
]

UPSAMPLE_MODES = ("indices", "nearest", "zeros", "bilinear")


# --------------------------------------------------------------------------- upsampling


def standardize_image(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Each image's channels to mean 0 and variance 1 over its own pixels (the models' ``input_norm``):
    ``F.instance_norm`` without affine parameters, written out so that a one-pixel image (which
    ``instance_norm`` refuses) becomes zeros instead of an error."""
    mean = x.mean((-2, -1), keepdim=True)
    var = (x - mean).square().mean((-2, -1), keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps)


def bilinear_kernel(in_channels: int, out_channels: int, kernel_size: int) -> Tensor:
    """The FCN upsampling initialisation: a bilinear filter on the channel diagonal.

    Returns ``Tensor[in_channels, out_channels, k, k]`` (the ``ConvTranspose2d`` weight layout)
    that is zero except ``w[i, i] = f`` for ``i < min(in_channels, out_channels)``, where
    ``f[a, b] = (1 - |a - c| / s) * (1 - |b - c| / s)``, ``s = (k + 1) // 2`` and
    ``c = s - 1`` for odd ``k``, ``s - 0.5`` for even ``k`` (Long et al.'s ``upsample_filt``).
    """
    if kernel_size < 1:
        raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    r = torch.arange(kernel_size, dtype=torch.float64)
    f1 = 1 - (r - center).abs() / factor
    filt = (f1[:, None] * f1[None, :]).to(torch.float32)
    weight = torch.zeros(in_channels, out_channels, kernel_size, kernel_size, dtype=torch.float32)  # any default
    n = min(in_channels, out_channels)
    weight[torch.arange(n), torch.arange(n)] = filt
    return weight


class BilinearUpsample(nn.ConvTranspose2d):
    """Channel-wise transposed convolution initialised to bilinear interpolation.

    ``Tensor[N, C, H, W] -> Tensor[N, C, factor*H, factor*W]``. The kernel is ``2*factor -
    factor % 2`` wide with stride ``factor`` and padding ``factor // 2``, so output pixel ``o``
    sits at input coordinate ``(o + 0.5) / factor - 0.5``: away from the border (where the
    transposed conv sees zeros instead of replicated edge values) it equals
    ``F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)`` at
    initialisation. With ``learnable=False`` the weight is frozen (``requires_grad=False``) but
    stays in the state dict, as in Caffe's fixed deconvolution layers. No bias.
    """

    def __init__(self, channels: int, factor: int, learnable: bool = True) -> None:
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        kernel = 2 * factor - factor % 2
        super().__init__(channels, channels, kernel, stride=factor, padding=factor // 2, bias=False)
        self.factor = factor
        with torch.no_grad():
            self.weight.copy_(bilinear_kernel(channels, channels, kernel))
        self.weight.requires_grad_(learnable)

    def reset_parameters(self) -> None:  # called by nn.ConvTranspose2d.__init__
        if hasattr(self, "factor"):
            with torch.no_grad():
                self.weight.copy_(bilinear_kernel(self.in_channels, self.out_channels, self.kernel_size[0]))


# --------------------------------------------------------------------------- conv blocks


def conv_bn_relu(
    in_channels: int, out_channels: int, kernel_size: int = 3, dilation: int = 1, stride: int = 1
) -> nn.Sequential:
    """``Conv2d(k, "same" padding, no bias) -> BatchNorm2d -> ReLU`` as ``nn.Sequential`` (keys
    ``0.weight``, ``1.*``). ``Tensor[N, in, H, W] -> Tensor[N, out, H/stride, W/stride]``."""
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def conv_relu(in_channels: int, out_channels: int, kernel_size: int = 3, dilation: int = 1) -> nn.Sequential:
    """``Conv2d(k, "same" padding, with bias) -> ReLU``; ``Tensor[N, in, H, W] -> Tensor[N, out, H, W]``."""
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation),
        nn.ReLU(inplace=True),
    )


def conv_bn(in_channels: int, out_channels: int, kernel_size: int = 3, relu: bool = True,
            transposed: bool = False, padding: int | None = None) -> nn.Sequential:
    """``Conv2d`` (or ``ConvTranspose2d``) *with* bias -> ``BatchNorm2d`` [-> ``ReLU``], keys
    ``0.*``, ``1.*`` (the Caffe SegNet / DeconvNet blocks, whose parameter counts include the
    bias). ``Tensor[N, in, H, W] -> Tensor[N, out, H', W']``; the default padding ``k // 2``
    keeps ``H' = H`` for odd ``k``; ``padding=0`` gives ``H - k + 1`` (conv) or ``H + k - 1``
    (transposed)."""
    pad = kernel_size // 2 if padding is None else padding
    conv_cls = nn.ConvTranspose2d if transposed else nn.Conv2d
    layers: list[nn.Module] = [conv_cls(in_channels, out_channels, kernel_size, padding=pad),
                               nn.BatchNorm2d(out_channels)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- unpooling


def max_unpool(x: Tensor, indices: Tensor, output_size: Sequence[int]) -> Tensor:
    """Undo a 2x2 / stride-2 max pool: each value goes back to the position its max came from.

    ``x``, ``indices``: ``Tensor[N, C, h, w]`` (indices from ``F.max_pool2d(...,
    return_indices=True)``, flat positions within each ``H*W`` plane); ``output_size``: the
    pre-pool ``(H, W)`` (needed when it was odd, e.g. ``H = 2*h + 1``). Returns
    ``Tensor[N, C, H, W]``, zero everywhere except at the recorded argmax positions.
    """
    size = list(output_size)[-2:]
    if x.shape != indices.shape:
        raise ValueError(f"x {tuple(x.shape)} and indices {tuple(indices.shape)} must have the same shape")
    return F.max_unpool2d(x, indices, kernel_size=(2, 2), stride=(2, 2), output_size=size)


def upsample_nearest(x: Tensor, factor: int = 2, output_size: Sequence[int] | None = None) -> Tensor:
    """Unlearned nearest-neighbour upsampling: each value is copied into a ``factor x factor`` cell.

    ``Tensor[N, C, h, w] -> Tensor[N, C, factor*h, factor*w]``; with ``output_size=(H, W)``
    (``H <= factor*h``) the result is cropped to ``Tensor[N, C, H, W]``.
    """
    y = x.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    return _crop_to(y, output_size)


def upsample_zeros(x: Tensor, factor: int = 2, output_size: Sequence[int] | None = None) -> Tensor:
    """Unlearned zero-insertion upsampling: each value goes to the top-left corner of its
    ``factor x factor`` cell and the rest of the cell is zero (a "fixed-index" unpooling).

    ``Tensor[N, C, h, w] -> Tensor[N, C, factor*h, factor*w]``; with ``output_size=(H, W)``
    the result is cropped to ``Tensor[N, C, H, W]``.
    """
    n, c, h, w = x.shape
    y = x.new_zeros(n, c, h * factor, w * factor)
    y[..., ::factor, ::factor] = x
    return _crop_to(y, output_size)


def _crop_to(y: Tensor, output_size: Sequence[int] | None) -> Tensor:
    if output_size is None:
        return y
    hh, ww = (int(s) for s in tuple(output_size)[-2:])
    if hh > y.shape[-2] or ww > y.shape[-1]:
        raise ValueError(f"output_size {(hh, ww)} is larger than the upsampled {tuple(y.shape[-2:])}")
    return y[..., :hh, :ww]


# --------------------------------------------------------------------------- decoder stages (SegNet, DeconvNet)


def unpools_by_index(model: nn.Module) -> bool:
    """Whether ``model`` (or a module in it) unpools with max-pooling indices (SegNet, Bayesian
    SegNet, DeconvNet, ENet). Such a model's output for one input depends on what it is stacked
    with: a batch runs other kernels, whose float32 rounding can move the position of a pooling
    window's maximum where its values nearly tie, and the unpooling then puts the value on another
    pixel (probabilities moved by 0.1, not 1e-5). Predictors run its inputs one at a time."""
    return any(getattr(m, "unpools_by_index", False) is True for m in model.modules())


def unpool(x: Tensor, indices: Tensor, size: Sequence[int], mode: str = "indices") -> Tensor:
    """2x upsampling of ``Tensor[N, C, h, w]`` to ``Tensor[N, C, H, W]`` (``size = (H, W)``, the
    pre-pool size). ``"indices"``: :func:`max_unpool` with the encoder's argmax ``indices``
    (same shape as ``x``); ``"nearest"``: :func:`upsample_nearest`; ``"zeros"``:
    :func:`upsample_zeros` (top-left of each cell); ``"bilinear"``: ``F.interpolate(...,
    align_corners=False)``. Only ``"indices"`` reads ``indices``. An odd pre-pool size (``H = 2h +
    1``) works with ``"indices"`` and ``"bilinear"`` only; SegNet pads its input so that it never
    occurs."""
    if mode == "indices":
        if torch.jit.is_tracing():  # F.max_unpool2d's Python-side size check fails under jit.trace
            # pixelwise export maps this to ONNX MaxUnpool, whose output is 2h x 2w (SegNet and
            # DeconvNet pad their input so that every pre-pool size is even)
            h, w = int(x.shape[-2]), int(x.shape[-1])
            if (int(size[-2]), int(size[-1])) != (2 * h, 2 * w):
                raise ValueError(f"tracing unpooling to {tuple(size[-2:])} from {(h, w)}: "
                                 "only even pre-pool sizes trace")
            return torch.ops.aten.max_unpool2d(x, indices, [2 * h, 2 * w])
        return max_unpool(x, indices, size)
    if mode == "nearest":
        return upsample_nearest(x, 2, size)
    if mode == "zeros":
        return upsample_zeros(x, 2, size)
    if mode == "bilinear":
        return F.interpolate(x, size=(size[-2], size[-1]), mode="bilinear", align_corners=False)
    raise ValueError(f"unknown upsampling {mode!r}; choose one of {', '.join(UPSAMPLE_MODES)}")


class DecoderStage(nn.Module):
    """One decoder stage: ``Tensor[N, C_in, h, w]`` -> :func:`unpool` (``mode``) to the pre-pool
    size ``(H, W)`` -> ``blocks`` -> ``Tensor[N, C_out, H, W]``. Keys ``blocks.*``."""

    def __init__(self, blocks: nn.Sequential, mode: str = "indices") -> None:
        super().__init__()
        if mode not in UPSAMPLE_MODES:
            raise ValueError(f"unknown upsampling {mode!r}; choose one of {', '.join(UPSAMPLE_MODES)}")
        self.mode = mode
        self.blocks = blocks

    @property
    def unpools_by_index(self) -> bool:
        return self.mode == "indices"

    def forward(self, x: Tensor, indices: Tensor, size: Sequence[int]) -> Tensor:
        return self.blocks(unpool(x, indices, size, self.mode))


def decoder_stages(layout: Sequence[Sequence[tuple[int, int, int]]], mode: str = "indices", relu: bool = True,
                   transposed: bool = False) -> list[DecoderStage]:
    """A decoder from its layout as data (e.g. ``pixelwise.backbones.vgg.mirror_channels``): per
    stage one :class:`DecoderStage` whose ``blocks`` are :func:`conv_bn` ``(in, out, k, relu,
    transposed)`` for each ``(in, out, k)`` of that stage."""
    return [DecoderStage(nn.Sequential(*(conv_bn(i, o, k, relu, transposed) for i, o, k in stage)), mode)
            for stage in layout]
