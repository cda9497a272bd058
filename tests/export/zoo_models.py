"""Small models written the way torchvision and timm write theirs, for the main venv (no torchvision there).

Each reproduces the operations of one family that the closed list of backward rules used to refuse: the
overlapping max-pool stem and avg-pool downsample of ResNet-D, the hardswish/SE heads of MobileNetV3, SiLU
and a BatchNorm subclass with its activation inside (timm's BatchNormAct2d) of EfficientNet, ConvNeXt's
channels-last LayerNorm/Linear/GELU with a layer scale and a LayerNorm2d subclass, DenseNet/GoogLeNet's
concatenations and functional ReLU, RegNet/ShuffleNet's GroupNorm, channel shuffle and chunk, Res2Net's
split scales, timm VGG's head that pools up to 7x7, Swin's shifted-window mask built by slice assignment, and
a tiny ViT.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class EfficientChannelAttention(nn.Module):
    """timm's EcaModule (ECA-ResNet): a Conv1d across the pooled channels, a sigmoid gate."""

    def __init__(self, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=(kernel_size - 1) // 2, bias=False)

    def forward(self, x):
        y = self.conv(x.mean((2, 3)).view(x.shape[0], 1, -1))
        return x * y.view(x.shape[0], -1, 1, 1).sigmoid()


class ResNetD(nn.Module):
    """Stem conv s2 + BN + ReLU + MaxPool2d(3, 2, 1); a bottleneck whose shortcut is AvgPool2d(2, 2,
    ceil_mode, count_include_pad=False) + 1x1 conv, with ECA attention (Conv1d) on the residual branch;
    functional pooling and torch.flatten in the head."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.reduce = nn.Conv2d(8, 4, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.conv3 = nn.Conv2d(4, 4, 3, 2, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4)
        self.expand = nn.Conv2d(4, 16, 1, bias=False)
        self.bn4 = nn.BatchNorm2d(16)
        self.eca = EfficientChannelAttention()
        self.down = nn.Sequential(nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False),
                                  nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = self.relu(self.bn2(self.reduce(x)))
        out = self.relu(self.bn3(self.conv3(out)))
        out = self.eca(self.bn4(self.expand(out)))
        out += self.down(x)
        out = self.relu(out)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeeze: int, gate=nn.Hardsigmoid):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.gate = gate()

    def forward(self, x):
        scale = self.gate(self.fc2(self.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return x * scale


class MobileNetV3ish(nn.Module):
    """Hardswish (module and functional), depthwise biased convs, an SE gate (x * hardsigmoid), ReLU6, then
    ``x.mean([2, 3])`` -> Linear -> Hardswish -> Dropout -> Linear."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.act = nn.Hardswish()
        self.dw = nn.Conv2d(8, 8, 3, 1, 1, groups=8)
        self.bn = nn.BatchNorm2d(8)
        self.se = SqueezeExcite(8, 4)
        self.pw = nn.Conv2d(8, 12, 1)
        self.relu6 = nn.ReLU6()
        self.hidden = nn.Linear(12, 16)
        self.head_act = nn.Hardswish()
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.act(self.stem(x))
        x = F.hardswish(self.bn(self.dw(x)))
        x = self.relu6(self.pw(self.se(x)))
        return self.fc(self.drop(self.head_act(self.hidden(x.mean([2, 3])))))


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a BatchNorm2d subclass whose forward also applies the activation."""

    def __init__(self, channels: int):
        super().__init__(channels)
        self.act = nn.SiLU()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return self.act(x)


def drop_path(x, p: float = 0.1, training: bool = False):
    """Stochastic depth: the identity in eval mode (a function torch.fx traces into the graph)."""
    if not training or p == 0.0:
        return x
    keep = torch.rand(x.shape[0], 1, 1, 1) > p
    return x * keep / (1 - p)


class EfficientNetish(nn.Module):
    """SiLU, BatchNormAct subclass leaves, an SE gate with sigmoid, drop-path residual, a 1x1 head conv."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.bn1 = BatchNormAct(8)
        self.dw = nn.Conv2d(8, 8, 5, 1, 2, groups=8, bias=False)
        self.bn2 = BatchNormAct(8)
        self.se = SqueezeExcite(8, 2, gate=nn.Sigmoid)
        self.project = nn.Conv2d(8, 8, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 16, 1, bias=False)
        self.bn4 = BatchNormAct(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(16, classes)

    def forward(self, x):
        x = self.bn1(self.stem(x))
        x = x + drop_path(self.bn3(self.project(self.se(self.bn2(self.dw(x))))))
        return self.classifier(self.flatten(self.pool(self.bn4(self.head(x)))))


class LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d: a LayerNorm subclass normalising the channels of an NCHW map by permuting."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.pwconv1 = nn.Linear(channels, 4 * channels)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * channels, channels)
        self.gamma = nn.Parameter(torch.full((channels,), 0.5))

    def forward(self, x):
        shortcut = x
        x = self.dwconv(x).permute(0, 2, 3, 1)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        x = x.mul(self.gamma)
        return shortcut + x.permute(0, 3, 1, 2)


class ConvNeXtish(nn.Module):
    """Channels-last blocks (permute, LayerNorm, Linear, GELU, layer scale as a Parameter), LayerNorm2d
    downsample, and a head that permutes *after* pooling (a 1x1 channels-last map that must not be the target)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, 4)
        self.stem_norm = LayerNorm2d(8)
        self.block1 = ConvNeXtBlock(8)
        self.down_norm = LayerNorm2d(8)
        self.down = nn.Conv2d(8, 16, 2, 2)
        self.block2 = ConvNeXtBlock(16)
        self.head_norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.block1(self.stem_norm(self.stem(x)))
        x = self.block2(self.down(self.down_norm(x)))
        x = F.adaptive_avg_pool2d(x, 1).permute(0, 2, 3, 1)
        return self.fc(self.head_norm(x).flatten(1))


class Inception(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.b1 = nn.Conv2d(channels, 4, 1)
        self.b2 = nn.Sequential(nn.Conv2d(channels, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
        self.b3 = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), nn.Conv2d(channels, 4, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x)], 1)


class DenseGoogLeNetish(nn.Module):
    """Dense concatenation with functional ReLU (DenseNet), an inception module ending in ``torch.cat`` (the
    default target is that cat: a node, named by its module), an AvgPool2d transition."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.norm0 = nn.BatchNorm2d(8)
        self.dense = nn.Conv2d(8, 4, 3, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(12)
        self.transition = nn.AvgPool2d(2, 2)
        self.inception = Inception(12)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(12, classes)

    def forward(self, x):
        x = F.relu(self.norm0(self.conv0(x)), inplace=True)
        x = torch.cat([x, self.dense(x)], 1)
        x = self.transition(F.relu(self.norm1(x)))
        x = self.inception(x)
        x = F.adaptive_avg_pool2d(x, (1, 1))
        return self.fc(self.dropout(torch.flatten(x, 1)))


def channel_shuffle(x, groups: int):
    batch, channels, height, width = x.size()
    x = x.view(batch, groups, channels // groups, height, width)
    return torch.transpose(x, 1, 2).contiguous().view(batch, -1, height, width)


class ShuffleRegNetish(nn.Module):
    """GroupNorm, grouped convs, chunk + concat, channel shuffle (view/transpose/contiguous with sizes read
    from the input), SiLU via torch.nn.functional, and an SE gate."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.gn = nn.GroupNorm(2, 8)
        self.branch = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.gn2 = nn.GroupNorm(2, 4)
        self.se = SqueezeExcite(8, 2, gate=nn.Sigmoid)
        self.head = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = F.silu(self.gn(self.stem(x)))
        left, right = x.chunk(2, dim=1)
        x = channel_shuffle(torch.cat([left, F.relu(self.gn2(self.branch(right)))], dim=1), 2)
        x = F.relu(self.head(self.se(x)))
        return self.fc(x.mean((2, 3)))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attention = (q @ k.transpose(-2, -1)) * (dim // self.heads) ** -0.5
        x = (attention.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj(x)


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Patch embedding (conv, flatten(2).transpose(1, 2)), class token, position embedding, two blocks,
    class-token pooling: the last blocks reach the logits only through the class token."""

    def __init__(self, classes: int = 10, dim: int = 16, patch: int = 8, size: int = 32):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + (size // patch) ** 2, dim) * 0.02)
        self.blocks = nn.Sequential(Block(dim), Block(dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class GhostModule(nn.Module):
    """timm's GhostModule: a primary conv, a cheap depthwise conv on its output, the two concatenated and
    sliced back to an odd channel count (``out[:, :out_chs, :, :]``: a slice whose batch entry is ``:``)."""

    def __init__(self, channels: int, out_chs: int):
        super().__init__()
        self.out_chs = out_chs
        init = (out_chs + 1) // 2
        self.primary = nn.Sequential(nn.Conv2d(channels, init, 1, bias=False), nn.BatchNorm2d(init), nn.ReLU())
        self.cheap = nn.Sequential(nn.Conv2d(init, init, 3, 1, 1, groups=init, bias=False), nn.BatchNorm2d(init),
                                   nn.ReLU())

    def forward(self, x):
        x1 = self.primary(x)
        out = torch.cat([x1, self.cheap(x1)], dim=1)
        return out[:, :self.out_chs, :, :]


class GhostNetish(nn.Module):
    """Two ghost modules (odd widths) with a residual, timm's GhostNet head: pool, 1x1 conv, ReLU, flatten."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.ghost1 = GhostModule(8, 11)
        self.ghost2 = GhostModule(11, 8)
        self.conv_head = nn.Conv2d(8, 24, 1)
        self.fc = nn.Linear(24, classes)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = x + self.ghost2(self.ghost1(x))
        x = F.relu(self.conv_head(F.adaptive_avg_pool2d(x, 1)))
        return self.fc(x.flatten(1))


class Conv2dSame(nn.Conv2d):
    """timm's Conv2dSame: TensorFlow 'same' padding computed from the input size, then the convolution (a
    subclass that rewrites forward: its weight's per-sample norms go through the generic rule)."""

    def forward(self, x):
        pad_h = max((-(-x.shape[-2] // self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0] - x.shape[-2], 0)
        pad_w = max((-(-x.shape[-1] // self.stride[1]) - 1) * self.stride[1] + self.kernel_size[1] - x.shape[-1], 0)
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class PatchBlock(nn.Module):
    """timm's MobileVitBlock, kept whole by the tracer (its forward branches on the map's size): a 3x3 conv, the
    map cut into 2x2 patches folded into the batch, LayerNorm + Linear across them, folded back, a 1x1 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv_kxk = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = nn.LayerNorm(channels)
        self.linear = nn.Linear(channels, channels)
        self.conv_proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        y = self.conv_kxk(x)
        batch, channels, height, width = y.shape
        if height % 2 or width % 2:
            y = F.interpolate(y, size=(height + height % 2, width + width % 2))
            height, width = y.shape[-2:]
        y = y.reshape(batch, channels, height // 2, 2, width // 2, 2).permute(0, 3, 5, 2, 4, 1)
        y = self.linear(self.norm(y.reshape(batch * 4, height * width // 4, channels)))
        y = y.reshape(batch, 2, 2, height // 2, width // 2, channels).permute(0, 5, 3, 1, 4, 2)
        return self.conv_proj(y.reshape(batch, channels, height, width)) + x


class MobileViTish(nn.Module):
    """A Conv2dSame stem and a whole MobileViT-like block: per-sample norms of convolutions traced under vmap."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = Conv2dSame(3, 8, 3, 2)
        self.bn = nn.BatchNorm2d(8)
        self.block = PatchBlock(8)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        x = self.block(F.silu(self.bn(self.stem(x))))
        return self.fc(x.mean((2, 3)))


class Res2Block(nn.Module):
    """timm's Bottle2neck: the 1x1 conv's output split into scales (``torch.split``), each scale's 3x3 conv fed
    the previous one's output plus its own split, and the last split passed on as ``spx[-1]`` (a negative
    index into a tuple), average-pooled in the first block of a stage; the scales concatenated."""

    def __init__(self, channels: int, width: int, scale: int, first: bool):
        super().__init__()
        self.width, self.first = width, first
        self.conv1 = nn.Conv2d(channels, width * scale, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width * scale)
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, 1, 1, bias=False) for _ in range(scale - 1))
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(scale - 1))
        self.pool = nn.AvgPool2d(3, 1, 1) if first else None
        self.conv3 = nn.Conv2d(width * scale, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        spx = torch.split(self.relu(self.bn1(self.conv1(x))), self.width, 1)
        spo = []
        sp = spx[0]
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            sp = spx[i] if i == 0 or self.first else sp + spx[i]
            sp = self.relu(bn(conv(sp)))
            spo.append(sp)
        spo.append(self.pool(spx[-1]) if self.pool is not None else spx[-1])
        return self.relu(self.bn3(self.conv3(torch.cat(spo, 1))) + x)


class Res2Netish(nn.Module):
    """Two Res2Net bottlenecks (the first of a stage with its pooled last scale, then a later one), and a head
    without a bias (as torchvision's MaxViT has)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block1 = Res2Block(16, 4, 4, first=True)
        self.block2 = Res2Block(16, 4, 4, first=False)
        self.fc = nn.Linear(16, classes, bias=False)

    def forward(self, x):
        return self.fc(self.block2(self.block1(self.stem(x))).mean((2, 3)))


class ConvMlp(nn.Module):
    """timm's VGG head: pools its input *up* to the 7x7 its first conv expects, with a size taken from the
    input's shape (control flow that torch.fx cannot trace, so the module is kept whole: generic rule)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, 7)
        self.fc2 = nn.Conv2d(hidden, hidden, 1)

    def forward(self, x):
        if x.shape[-2] < 7 or x.shape[-1] < 7:
            x = F.adaptive_avg_pool2d(x, (max(7, x.shape[-2]), max(7, x.shape[-1])))
        return F.relu(self.fc2(F.relu(self.fc1(x))))


class ConvMlpVGGish(nn.Module):
    """timm's VGG: features down to 2x2, the ConvMlp head, global pooling into the Linear."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(4), nn.Conv2d(8, 8, 3, 1, 1), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(4))
        self.pre_logits = ConvMlp(8, 12)
        self.head = nn.Linear(12, classes)

    def forward(self, x):
        return self.head(self.pre_logits(self.features(x)).mean((2, 3)))


@torch.fx.wrap
def shifted_window_mix(x, weight, bias, window: int, shift: int):
    """Attention within windows of a cyclically shifted channels-last map, as torchvision's
    ``shifted_window_attention`` (an fx leaf there too): the mask of the windows the shift wraps around is built
    by slice assignment with negative ends."""
    batch, height, width, channels = x.shape
    x = torch.roll(x, (-shift, -shift), (1, 2))
    mask = x.new_zeros((height, width))
    count = 0
    for h in ((0, -window), (-window, -shift), (-shift, None)):
        for w in ((0, -window), (-window, -shift), (-shift, None)):
            mask[h[0]:h[1], w[0]:w[1]] = count
            count += 1
    rows, cols, tokens = height // window, width // window, window * window

    def windows(t, c):
        return t.reshape(-1, rows, window, cols, window, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, tokens, c)

    patches = windows(x, channels)
    labels = windows(mask[None, :, :, None], 1)[:, :, 0]
    apart = (labels[:, :, None] != labels[:, None, :]).to(x.dtype) * -100.0  # [windows, tokens, tokens]
    scores = F.linear(patches, weight, bias) @ patches.transpose(1, 2) * channels ** -0.5
    scores = (scores.reshape(batch, rows * cols, tokens, tokens) + apart).reshape(-1, tokens, tokens)
    mixed = scores.softmax(dim=-1) @ patches
    mixed = mixed.reshape(batch, rows, cols, window, window, channels).permute(0, 1, 3, 2, 4, 5)
    return torch.roll(mixed.reshape(batch, height, width, channels), (shift, shift), (1, 2))


class ShiftedWindowBlock(nn.Module):
    def __init__(self, dim: int, window: int, shift: int):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm = nn.LayerNorm(dim)
        self.qk = nn.Linear(dim, dim)

    def forward(self, x):
        return x + shifted_window_mix(self.norm(x), self.qk.weight, self.qk.bias, self.window, self.shift)


class SwinIsh(nn.Module):
    """A channels-last patch embedding and two window blocks, the second shifted: the shifted-window mask that
    the exporter's slice_scatter used to break in the traced backward."""

    def __init__(self, classes: int = 10, dim: int = 8):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.blocks = nn.Sequential(ShiftedWindowBlock(dim, 4, 0), ShiftedWindowBlock(dim, 4, 2))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.norm(self.blocks(self.embed(x).permute(0, 2, 3, 1)))
        return self.head(x.mean((1, 2)))



class WindowAttention(nn.Module):
    """timm's Swin attention: the map's windows folded into the batch ([images * windows, tokens, channels]),
    qkv and proj Linears on them, and a learned bias over token pairs added to the scores (a parameter read by
    an ``add`` on the folded rows: the generic rule's per-sample norms sum each image's windows)."""

    def __init__(self, dim: int, window: int, image_major: bool = True):
        super().__init__()
        self.window, self.image_major = window, image_major
        self.qkv = nn.Linear(dim, 3 * dim)
        self.bias = nn.Parameter(0.1 * torch.randn(window * window, window * window))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        batch, height, width, channels = x.shape
        rows, cols, window = height // self.window, width // self.window, self.window
        order = (0, 1, 3, 2, 4, 5) if self.image_major else (1, 3, 0, 2, 4, 5)  # windows image by image, or not
        windows = x.reshape(batch, rows, window, cols, window, channels).permute(*order)
        windows = windows.reshape(-1, window * window, channels)
        q, k, v = self.qkv(windows).chunk(3, dim=-1)
        scores = q @ k.transpose(1, 2) * channels ** -0.5 + self.bias
        mixed = self.proj(scores.softmax(dim=-1) @ v)
        shape = (batch, rows, cols, window, window, channels) if self.image_major else \
            (rows, cols, batch, window, window, channels)
        back = (0, 1, 3, 2, 4, 5) if self.image_major else (2, 0, 3, 1, 4, 5)
        return x + mixed.reshape(shape).permute(*back).reshape(batch, height, width, channels)


class WindowSwinIsh(nn.Module):
    """A channels-last patch embedding, one window-attention block with its windows folded into the batch."""

    def __init__(self, classes: int = 10, dim: int = 8, image_major: bool = True):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.attention = WindowAttention(dim, 4, image_major)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.norm(self.attention(self.embed(x).permute(0, 2, 3, 1)))
        return self.head(x.mean((1, 2)))


class Fire(nn.Module):
    """SqueezeNet's fire module: a 1x1 squeeze conv, then 1x1 and 3x3 expand convs concatenated."""

    def __init__(self, inputs: int, squeeze: int, expand: int):
        super().__init__()
        self.squeeze = nn.Conv2d(inputs, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.squeeze(x))
        return torch.cat([torch.relu(self.expand1x1(x)), torch.relu(self.expand3x3(x))], 1)


class SqueezeNetish(nn.Module):
    """torchvision's SqueezeNet: no Linear; a 1x1 conv classifies every position, then ReLU and global average
    pooling (the logits read each class's own positions). A BatchNorm centres the fire modules' output, so that
    on noise images each class's map is positive at some positions only (as a trained one is)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, 2), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, 2, ceil_mode=True), Fire(16, 8, 16), Fire(32, 8, 16),
                                      nn.BatchNorm2d(32))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(32, classes, 1), nn.ReLU(inplace=True),
                                        nn.AdaptiveAvgPool2d((1, 1)))

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


ZOO = {"resnet_d": ResNetD, "mobilenet_v3": MobileNetV3ish, "efficientnet": EfficientNetish,
       "convnext": ConvNeXtish, "densenet_googlenet": DenseGoogLeNetish, "shufflenet_regnet": ShuffleRegNetish,
       "vit": TinyViT, "ghostnet": GhostNetish,
       "mobilevit": MobileViTish, "res2net": Res2Netish, "vgg_conv_mlp": ConvMlpVGGish, "swin": SwinIsh,
       "swin_windows": WindowSwinIsh, "squeezenet": SqueezeNetish}


def make_zoo_model(name: str, seed: int = 0) -> nn.Module:
    """A zoo model with random affine normalisation parameters and BatchNorm statistics from noise, eval mode."""
    torch.manual_seed(seed)
    model = ZOO[name]()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)) and \
                    getattr(module, "weight", None) is not None:
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = None
        model.train()
        for _ in range(2):
            model(torch.rand(16, 3, 32, 32, generator=generator))
        for module in model.modules():  # no near-zero variances: they would amplify rounding ~300x
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_var.clamp_(min=float(0.1 * module.running_var.mean()))
    return model.eval()
