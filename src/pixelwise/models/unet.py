"""U-Net: Ronneberger, Fischer, Brox, "U-Net: Convolutional Networks for Biomedical Image
Segmentation", MICCAI 2015 (arXiv:1505.04597).

Contracting path: four levels of two 3x3 convolutions + ReLU followed by 2x2 max-pooling, the
channels doubling from ``base_channels`` (64) to 16x that (1024) at the bottom. Expanding path:
2x2 up-convolution halving the channels, concatenation with the (centre-cropped) skip feature
map, two 3x3 convolutions + ReLU. A final 1x1 convolution maps to the classes. With
``base_channels=64``, one input channel and two classes it has 31,030,658 parameters, as the
paper's network.

Options and where we differ from the paper:
- ``padding="valid"`` is the paper's unpadded network. To still return logits at the input size
  for any H, W, the input is mirror-padded (the paper's overlap-tile strategy: missing context
  is extrapolated by mirroring) to the smallest size whose pooling steps all see even sizes, and
  the output is cropped. ``padding="same"`` uses zero-padded convolutions (the common variant);
  the input is padded to a multiple of 16 and the output cropped.
- ``batch_norm`` (off by default, as in the paper) adds BatchNorm after each convolution; it
  makes small-batch CPU training much faster to converge.
- ``dropout`` (0.5 as in the paper) is applied at the end of the contracting path; in [0, 1).
- ``in_channels`` defaults to 3 (RGB); the paper's EM images have 1 channel.
- ``input_norm`` (off by default) standardises each image per channel over its own pixels
  (instance normalisation without learnt parameters) before the network: the output no longer
  depends on an image's brightness, contrast or colour cast, which changes from one street, camera
  or hour to the next. Under tiled inference each tile is standardised on its own pixels.
  SegNet (arXiv:1511.00561) applies local contrast normalisation to its inputs for the same reason.
- ``global_context`` (off by default) adds the image-level feature of ParseNet (Liu, Rabinovich,
  Berg, "ParseNet: Looking Wider to See Better", arXiv:1506.04579) at the bottom of the network:
  the bottleneck map is averaged over the whole image, mapped by a 1x1 convolution + ReLU,
  broadcast back to every position, concatenated and fused by a 1x1 convolution (+ BatchNorm
  with ``batch_norm``) + ReLU, so every pixel's decision can see the whole scene (a wall of a
  house and the crown of a tree look alike up close; the street around them does not). Under
  tiled inference the context is each tile's.
- ``ibn_levels`` (0 by default) makes the first normalisation of the first ``ibn_levels`` levels
  of the contracting path IBN-a (Pan, Luo, Shi, Tang, "Two at Once: Enhancing Learning and
  Generalization Capacities via IBN-Net", ECCV 2018, arXiv:1807.09441): half of the channels are
  instance-normalised, so the early features keep what an object is and shed the appearance
  (light, colour, contrast) of the scene it was filmed in, the other half batch-normalised.
  Needs ``batch_norm`` and ``base_channels >= 2`` (each half at least one channel).

The paper's boundary weight map, ``w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))``,
is :func:`unet_weight_map`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelwise.errors import brief
from pixelwise.layers import conv_bn_relu, conv_relu, standardize_image
from pixelwise.models._checks import dropout_rate
from pixelwise.models.registry import register_model
from pixelwise.weights import load_matching, read_weights

DEPTH = 4  # number of 2x2 poolings


class IBN(nn.Module):
    """IBN-Net's IBN-a normalisation: the first half of the channels instance-normalised (learnt
    scale and shift), the rest batch-normalised."""

    def __init__(self, channels: int):
        super().__init__()
        if channels < 2:
            raise ValueError(f"IBN splits its channels into an instance- and a batch-normalised half: it needs at "
                             f"least 2, got {channels}")
        self.instance = nn.InstanceNorm2d(channels // 2, affine=True)
        self.batch = nn.BatchNorm2d(channels - channels // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.instance.num_features
        return torch.cat([self.instance(x[:, :half]), self.batch(x[:, half:])], dim=1)


def double_conv(cin: int, cout: int, padding: int, batch_norm: bool, ibn: bool = False) -> nn.Sequential:
    """Two 3x3 convolutions, each followed by [BatchNorm and] ReLU; ``ibn``: the first norm is :class:`IBN`."""
    layers: list[nn.Module] = []
    for i, c in enumerate((cin, cout)):
        layers.append(nn.Conv2d(c, cout, 3, padding=padding, bias=not batch_norm))
        if batch_norm:
            layers.append(IBN(cout) if ibn and i == 0 else nn.BatchNorm2d(cout))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def center_crop(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Tensor[N, C, H, W] -> Tensor[N, C, h, w], the centre part."""
    top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    return x[..., top : top + h, left : left + w]


def mirror_pad(x: torch.Tensor, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    """Reflect-pad Tensor[N, C, H, W] by any amount: pads larger than the image reflect again
    (the image repeated mirror-wise, period ``2 (H - 1)``; a side of 1 pixel is replicated).

    Written as one gather per axis whose indices are arithmetic on the sizes, so that a traced
    or exported program (``pixelwise export``) pads correctly at every input size; the values
    are those of repeated ``F.pad(mode="reflect")``."""
    return _reflect_axis(_reflect_axis(x, top, bottom, -2), left, right, -1)


def _is_exporting() -> bool:
    """Whether ``torch.export`` is tracing (``torch.compiler.is_exporting``; False on a torch without it)."""
    return bool(getattr(torch.compiler, "is_exporting", lambda: False)())


def _size(n) -> torch.Tensor:
    """A size as an int64 0-d tensor that both exporters keep symbolic: the ONNX tracer records
    the arithmetic behind it, and ``torch.export`` keeps it a symbol (``torch.as_tensor`` would fix
    it to the example's value there)."""
    return torch.scalar_tensor(n, dtype=torch.int64)


def _reflect_axis(x: torch.Tensor, before, after, dim: int) -> torch.Tensor:
    n = x.shape[dim]
    period = torch.clamp(_size(2 * (n - 1)), min=1)
    i = torch.remainder(torch.arange(-before, n + after, device=x.device), period)
    return x.index_select(dim, torch.where(i >= n, period - i, i))


def pad_same(x: torch.Tensor, bottom: int, right: int) -> torch.Tensor:
    """Pad Tensor[N, C, H, W] at the bottom and right by reflection when both pads are smaller than
    both sides (``F.pad(mode="reflect")``), else by replication (``mode="replicate"``).

    One gather per axis, the choice made by tensor arithmetic on the sizes, so that an exported
    program (``pixelwise export``) pads like eager at every input size."""
    h, w = x.shape[-2], x.shape[-1]
    reflect = torch.minimum(_size(h), _size(w)) > torch.maximum(_size(bottom), _size(right))
    for dim, n, pad in ((-2, h, bottom), (-1, w, right)):
        i = torch.arange(n + pad, device=x.device)
        # the last index where i >= n: torch.where, not clamp, which on int64 exports to a Clip opset 11 lacks
        index = torch.where(reflect, torch.where(i < n, i, 2 * (n - 1) - i), torch.where(i < n, i, n - 1))
        x = x.index_select(dim, index)
    return x


def valid_output_size(size: int) -> int | None:
    """Output side of the valid-padding U-Net for an input side, or None if some pooling would
    see an odd size (or the map vanishes)."""
    s = size
    for _ in range(DEPTH):
        s -= 4
        if s <= 0 or s % 2:
            return None
        s //= 2
    s -= 4
    if s <= 0:
        return None
    for _ in range(DEPTH):
        s = 2 * s - 4
    return s if s > 0 else None  # a bottom map of 1-3 pixels vanishes on the way up (2s - 4 stays <= 0 from there)


def valid_tile(size: int) -> tuple[int, int]:
    """``(input, output)`` sides of the smallest valid input whose output covers ``size`` pixels.

    Closed form (so that it stays arithmetic on a traced size): going down, each level loses 4
    pixels and halves, so valid inputs are ``i = 2^D s + 4 (2^D - 1)`` for a bottom-level input
    ``s``, whose output is ``o = i - (12 * 2^D - 8)`` (184 for D = 4); the smallest ``s`` with
    ``o >= size`` is ``ceil((size + 8 * 2^D - 4) / 2^D)``, always > 4, so the bottom level is
    never empty (``tests/test_unet.py`` checks it against :func:`valid_output_size`)."""
    step = 2**DEPTH
    s = (size + 8 * step - 4 + step - 1) // step
    i = step * s + 4 * (step - 1)
    return i, i - (12 * step - 8)


def valid_input_size(size: int) -> int:
    """Smallest valid input side whose output covers ``size`` pixels."""
    return valid_tile(size)[0]


class GlobalContext(nn.Module):
    """ParseNet's global feature: ``fuse([x, relu(conv1x1(mean_hw(x)))])``, channels kept."""

    def __init__(self, channels: int, batch_norm: bool):
        super().__init__()
        self.pool_conv = nn.Conv2d(channels, channels, 1)
        self.fuse = (conv_bn_relu if batch_norm else conv_relu)(2 * channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = F.relu(self.pool_conv(x.mean((-2, -1), keepdim=True)))
        return self.fuse(torch.cat([x, g.expand_as(x)], dim=1))


class UNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, base_channels: int = 64,
                 padding: str = "same", batch_norm: bool = False, dropout: float = 0.5,
                 input_norm: bool = False, global_context: bool = False, ibn_levels: int = 0):
        super().__init__()
        for key, value in (("in_channels", in_channels), ("base_channels", base_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a whole number >= 1, got {brief(value)}")
        if isinstance(ibn_levels, bool) or not isinstance(ibn_levels, int) or not 0 <= ibn_levels <= DEPTH + 1:
            raise ValueError(f"ibn_levels must be a whole number in 0..{DEPTH + 1} (levels of the contracting path), "
                             f"got {ibn_levels!r}")
        if ibn_levels and not batch_norm:
            raise ValueError("ibn_levels replaces half of BatchNorm's channels: it needs batch_norm=True")
        if ibn_levels and base_channels < 2:
            raise ValueError(f"ibn_levels splits the channels of the first level (base_channels={base_channels}) "
                             "into an instance-normalised and a batch-normalised half: it needs base_channels >= 2")
        dropout = dropout_rate(dropout)
        self.in_channels = in_channels  # the input contract's channels (checkpoint.model_input_spec)
        self.input_norm = input_norm
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}")
        self.padding = padding
        # what tiled inference reads (pixelwise.inference.tiling): the input an output pixel needs on
        # each side, which the unpadded convolutions consume ((572 - 388) / 2 = 92; none is stated for
        # "same", whose zero padding reaches across the image, nor where an option makes every output
        # pixel depend on the whole image: input_norm's and IBN's per-image statistics, the global
        # context's mean), and the grid of the 2x2 poolings
        i, o = valid_tile(1)
        local = padding == "valid" and not (input_norm or global_context or ibn_levels)
        self.context = (i - o) // 2 if local else 0
        self.alignment = 2**DEPTH
        p = 1 if padding == "same" else 0
        chans = [base_channels * 2**i for i in range(DEPTH + 1)]
        self.down = nn.ModuleList()
        cin = in_channels
        for level, c in enumerate(chans):
            self.down.append(double_conv(cin, c, p, batch_norm, ibn=level < ibn_levels))
            cin = c
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.global_context = GlobalContext(chans[-1], batch_norm) if global_context else None
        self.upconv = nn.ModuleList()
        self.up = nn.ModuleList()
        for c in reversed(chans[:-1]):
            self.upconv.append(nn.ConvTranspose2d(2 * c, c, 2, stride=2))
            self.up.append(double_conv(2 * c, c, p, batch_norm))
        self.head = nn.Conv2d(chans[0], num_classes, 1)
        for m in self.modules():  # the paper's init: Gaussian, std sqrt(2 / fan_in)
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The raw network: Tensor[N, Cin, H, W] -> logits, smaller than H, W for valid padding."""
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < DEPTH:
                skips.append(x)
                x = F.max_pool2d(x, 2)
        if self.global_context is not None:
            x = self.global_context(x)
        x = self.dropout(x)
        for upconv, block, skip in zip(self.upconv, self.up, reversed(skips)):
            x = upconv(x)
            x = block(torch.cat([center_crop(skip, x.shape[-2], x.shape[-1]), x], dim=1))  # no *: torch.fx traces it
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tensor[N, Cin, H, W] -> logits Tensor[N, num_classes, H, W], for any H, W."""
        h, w = x.shape[-2:]
        if self.input_norm:  # each image's channels to mean 0, variance 1 over its own pixels
            x = standardize_image(x)
        if self.padding == "same":
            step = 2**DEPTH  # padded up to a multiple of step, written so that torch.export sees it is one
            padded = (h + step - 1) // step * step, (w + step - 1) // step * step
            out = self.forward_features(pad_same(x, padded[0] - h, padded[1] - w))
            if not _is_exporting():
                return out[..., :h, :w]
            # torch.export: cropped by a gather, as a sliced output makes it assume the padding of its example
            # (a gather in eager costs 2% of a training step)
            rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
            return out.index_select(-2, rows).index_select(-1, cols)
        (ih, oh), (iw, ow) = valid_tile(h), valid_tile(w)
        top, left = (ih - oh) // 2, (iw - ow) // 2  # context the valid convolutions consume
        x = mirror_pad(x, top, ih - h - top, left, iw - w - left)
        return self.forward_features(x)[..., :h, :w]


@register_model("unet", paper="Ronneberger et al., MICCAI 2015")
def unet(num_classes: int, pretrained: str | None = None, **kwargs) -> UNet:
    """U-Net as in the paper; kwargs: in_channels, base_channels, padding, batch_norm, dropout, input_norm,
    global_context, ibn_levels."""
    model = UNet(num_classes, **kwargs)
    if pretrained:
        load_matching(model, read_weights(pretrained), f"unet(pretrained={pretrained!r})")
    return model


def unet_weight_map(instance_masks: np.ndarray, class_mask: np.ndarray | None = None,
                    w0: float = 10.0, sigma: float = 5.0,
                    class_weights: np.ndarray | None = None) -> np.ndarray:
    """The U-Net paper's per-pixel loss weights (Eq. 2).

    instance_masks: bool[K, H, W] (one mask per cell/object). class_mask: uint8[H, W] class ids
    used for the class-balancing term ``w_c`` (default: foreground = any instance).
    class_weights: float[C] (default: inverse class frequency in this mask, normalised so the
    most frequent class has weight 1). Returns float32[H, W]:
    ``w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))`` where d1, d2 are the Euclidean
    distances to the nearest and second-nearest object; the border term is applied to
    background pixels (those in no object), which is where touching objects are separated.
    With fewer than two objects the border term is zero.
    """
    # start-up time: scipy.ndimage adds about 0.5 s to every `import pixelwise.models`; only this needs it
    from scipy.ndimage import distance_transform_edt

    masks = np.asarray(instance_masks, dtype=bool)
    k, h, w = masks.shape if masks.ndim == 3 else (0, *np.asarray(class_mask).shape)
    if class_mask is None:
        class_mask = np.asarray(masks.any(axis=0)) if k else np.zeros((h, w), np.int64)
    classes = np.asarray(class_mask).astype(np.int64)
    if class_weights is None:
        freq = np.bincount(classes[classes != 255].ravel())
        with np.errstate(divide="ignore"):
            class_weights = np.where(freq > 0, freq.max() / np.maximum(freq, 1), 0.0)
    lut = np.zeros(256, dtype=np.float64)
    lut[: len(class_weights)] = class_weights
    weight = lut[classes]
    if k >= 2:
        dist = np.stack([distance_transform_edt(~m) for m in masks])  # 0 inside object k
        dist.sort(axis=0)
        border = w0 * np.exp(-((dist[0] + dist[1]) ** 2) / (2 * sigma**2))
        weight = weight + np.where(masks.any(0), 0.0, border)
    return weight.astype(np.float32)
