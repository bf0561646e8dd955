"""The two networks of EchoNet-Synthetic's latent video diffusion model, written out in PyTorch:
`UNetSpatioTemporal`, the Stable Video Diffusion UNet (diffusers' UNetSpatioTemporalCondition-
Model: 2D ResNets and spatial attention, each followed by a temporal ResNet / temporal attention,
mixed by a learned alpha), and `AutoencoderKL`, the VAE (112x112 frames <-> 4x14x14 latents).
Both load the published diffusers-format folders key for key and compute what diffusers 0.42.1
does, bit for bit in fp32 (tests/test_model.py). The file ends with model folders and checkpoints.

    python model.py                  # smoke run: build the "tiny" presets, one forward pass each
    python model.py --preset lvdm    # the paper's UNet (143.8 M parameters)

References: Reynaud et al. 2024, "EchoNet-Synthetic" (the LVDM, its configuration); Blattmann et
al. 2023, "Stable Video Diffusion" and "Align your Latents" (temporal layers after spatial ones,
mixed by a learned alpha); Rombach et al. 2022, "Latent Diffusion Models" (the VAE); Vaswani et
al. 2017 (attention); Shazeer 2020, "GLU Variants" (GEGLU).

Shapes: B batch, F frames, N = B*F frames folded into the batch, C channels, H/W height/width,
L = H*W tokens of a frame, D time-embedding width. Attribute names are diffusers' (so the keys
match the checkpoints); class names and comments explain.
"""

import argparse
import dataclasses
import json
import math
import os
import shutil

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch.utils.checkpoint import checkpoint

# --- config ------------------------------------------------------------------------------------
# Field names and defaults are diffusers'; EchoNet-Synthetic's values are the presets below. The
# UNet's block types (diffusers' names): with attention (CrossAttn...) or ResNets only.
XDOWN, DOWN = "CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"
XUP, UP = "CrossAttnUpBlockSpatioTemporal", "UpBlockSpatioTemporal"

@dataclasses.dataclass
class UNetConfig:
    sample_size: int | None = None        # latent size at training (forward does not read it)
    in_channels: int = 8                  # 4 noisy latent channels + 4 of the conditioning frame
    out_channels: int = 4                 # the prediction (v in EchoNet-Synthetic)
    down_block_types: tuple = (XDOWN, XDOWN, XDOWN, DOWN)  # highest resolution first
    up_block_types: tuple = (UP, XUP, XUP, XUP)
    block_out_channels: tuple = (320, 640, 1280, 1280)  # channels per resolution
    addition_time_embed_dim: int = 256    # sinusoid width per added time id
    projection_class_embeddings_input_dim: int = 768  # = addition_time_embed_dim * number of ids
    layers_per_block: int | tuple = 2     # ResNets per down block (up blocks get one more)
    cross_attention_dim: int | tuple = 1024  # width of encoder_hidden_states tokens (1: the EF)
    transformer_layers_per_block: int | tuple = 1  # transformer layers in each attention module
    num_attention_heads: int | tuple = (5, 10, 20, 20)  # heads per resolution
    num_frames: int = 25                  # frames the model was trained on (not used by forward)

@dataclasses.dataclass
class VAEConfig:
    in_channels: int = 3                  # RGB frames in [-1, 1]
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",)
    up_block_types: tuple = ("UpDecoderBlock2D",)
    block_out_channels: tuple = (64,)     # channels per resolution; len - 1 = number of 2x steps
    layers_per_block: int = 1             # ResNets per encoder block (decoder blocks get one more)
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32                 # image size the VAE was trained at (not used by forward)
    scaling_factor: float = 0.18215       # latents are z * scaling_factor for the UNet
    shift_factor: float | None = None     # kept for the config; unused by the original
    latents_mean: tuple | None = None
    latents_std: tuple | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True           # 1x1 conv on the encoder's moments
    use_post_quant_conv: bool = True      # 1x1 conv on the latent before decoding
    mid_block_add_attention: bool = True  # one self-attention in each mid block

# "lvdm": echosyn/lvdm/configs/default.yaml (143,830,186 parameters); "echonet": the published VAE
# (62,412,007); the small ones train on a CPU for the demo and the tests. EchoNet's conditioning:
# the EF as one 1-wide token, one added time id (whose embedding is 0).
ECHONET = dict(sample_size=14, cross_attention_dim=1, addition_time_embed_dim=1,
               projection_class_embeddings_input_dim=1)
UNET_PRESETS = {
    "lvdm": UNetConfig(block_out_channels=(128, 256, 256, 512), num_attention_heads=(8, 16, 16, 32),
                       layers_per_block=2, num_frames=64, **ECHONET),
    "small": UNetConfig(block_out_channels=(64, 128, 128), num_attention_heads=(4, 8, 8),
                        down_block_types=(XDOWN, XDOWN, DOWN), up_block_types=(UP, XUP, XUP),
                        layers_per_block=1, num_frames=32, **ECHONET),
    "phantom": UNetConfig(  # the CPU demo's: 2 resolutions, about 1.3 M parameters
        block_out_channels=(32, 64), num_attention_heads=(2, 4), down_block_types=(XDOWN, XDOWN),
        up_block_types=(XUP, XUP), layers_per_block=1, num_frames=24, **ECHONET),
    "tiny": UNetConfig(block_out_channels=(32, 64), num_attention_heads=(2, 4),
                       down_block_types=(XDOWN, DOWN), up_block_types=(UP, XUP),
                       layers_per_block=1, num_frames=8, **ECHONET),
}
VAE4 = dict(sample_size=112, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4)  # 4 resolutions: 112x112 -> 14x14
VAE_PRESETS = {
    "echonet": VAEConfig(block_out_channels=(128, 256, 256, 512), layers_per_block=2, **VAE4),
    "small": VAEConfig(block_out_channels=(32, 64, 64, 64), **VAE4),
    "phantom": VAEConfig(block_out_channels=(16, 32, 32, 64), norm_num_groups=8,  # the demo's:
                         mid_block_add_attention=False, **VAE4),  # 8 groups fit 16 channels
    "tiny": VAEConfig(block_out_channels=(32, 32, 32, 32), **VAE4),
}

def per_block(value, n: int) -> list:
    """An int (or other scalar) repeated n times, or a per-block list checked to have n entries."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"expected {n} per-block values, got {values}")
    return values

# --- building blocks, smallest first -----------------------------------------------------------
def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [len(t), dim], cosines first (diffusers' flip_sin_to_cos=True)."""
    # freq_k = 10000^(-k / half) for k < half = dim // 2 (Vaswani et al. 2017, Sec. 3.5), in
    # float32 and in diffusers' order of operations, so that results match bit for bit.
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    arg = t[:, None].float() * torch.exp(exponent)[None, :]  # (len(t), half)
    emb = torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)
    # An odd dim gets a zero column: with dim = 1 (EchoNet's added time ids) all is zero.
    return F.pad(emb, (0, 1)) if dim % 2 else emb

class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> Linear: the MLP applied to a sinusoidal embedding."""
    def __init__(self, in_dim: int, dim: int, out_dim: int | None = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, out_dim or dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))

class AlphaBlender(nn.Module):
    """a * x_spatial + (1 - a) * x_temporal with a = sigmoid(mix_factor), learned (init 0.5)."""
    def __init__(self):
        super().__init__()
        self.mix_factor = nn.Parameter(torch.tensor([0.5]))

    def forward(self, x_spatial, x_temporal):  # (diffusers' a = 1 for still images: none here)
        a = torch.sigmoid(self.mix_factor).to(x_spatial.dtype)
        return a * x_spatial + (1.0 - a) * x_temporal

class Attention(nn.Module):
    """Multi-head attention (Vaswani et al. 2017) of L tokens to themselves or to S others."""
    def __init__(self, dim: int, heads: int, bias=False, groups=0, context_dim: int | None = None):
        super().__init__()
        self.heads = heads  # each of width dim / heads
        self.group_norm = nn.GroupNorm(groups, dim, eps=1e-6) if groups else None  # VAE only
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=bias)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # diffusers' to_out.1 is Dropout(0)

    def forward(self, x, context=None):  # x: (B, L, C), context: (B, S, Dc) or None
        context = x if context is None else context
        v = self.to_v(context)                                           # (B, S, C)
        if context.shape[1] == 1:
            # One context token (EchoNet's EF): softmax over one key is exactly 1, so every query
            # receives its value whatever the queries (to_q, to_k and the norm before do not
            # matter). to_out runs on all L copies of v, so the rows round as diffusers' do.
            return self.to_out[0](v.expand(-1, x.shape[1], -1).contiguous())  # (B, L, C)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2)   # (B, heads, L or S, C/heads)
                   for t in (self.to_q(x), self.to_k(context), v))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v
        return self.to_out[0](out.transpose(1, 2).flatten(2).to(q.dtype))  # (B, L, C)

class FeedForward(nn.Module):
    """GEGLU feed-forward (Shazeer 2020): Linear to 2 x 4C, value * GELU(gate), Linear back to C."""
    def __init__(self, dim: int):
        super().__init__()
        # diffusers' keys: net.0.proj in its GEGLU module, net.1 a Dropout(0), net.2 the output
        self.net = nn.ModuleList([nn.ModuleDict({"proj": nn.Linear(dim, 8 * dim)}), nn.Identity(),
                                  nn.Linear(4 * dim, dim)])

    def forward(self, x):  # x: (..., C)
        value, gate = self.net[0]["proj"](x).chunk(2, dim=-1)  # (..., 4C) each
        return self.net[2](value * F.gelu(gate))

class TransformerBlock(nn.Module):
    """Pre-norm transformer layer: self-attention, cross-attention to the context, GEGLU MLP."""
    def __init__(self, dim: int, heads: int, context_dim: int, temporal: bool):
        super().__init__()
        # Spatial (diffusers' BasicTransformerBlock): over the L tokens of each frame. Temporal
        # (TemporalBasicTransformerBlock): over the F frames at each pixel, with a GEGLU first.
        self.norm_in = nn.LayerNorm(dim) if temporal else None
        self.ff_in = FeedForward(dim) if temporal else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim=context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, h, context):  # h: (N, L, C) or (B*L, F, C); context: (same rows, S, Dc)
        if self.ff_in is not None:
            h = h + self.ff_in(self.norm_in(h))
        h = h + self.attn1(self.norm1(h))  # no mask: every token (pixel or frame) sees all
        h = h + self.attn2(self.norm2(h), context)
        return h + self.ff(self.norm3(h))

class TransformerSpatioTemporal(nn.Module):
    """Attention module: a spatial transformer per frame, a temporal one per pixel, blended."""
    def __init__(self, channels: int, heads: int, num_layers: int, context_dim: int):
        super().__init__()
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(channels, heads, context_dim, False) for _ in range(num_layers)])
        self.temporal_transformer_blocks = nn.ModuleList(
            [TransformerBlock(channels, heads, context_dim, True) for _ in range(num_layers)])
        self.time_pos_embed = TimestepEmbedding(channels, 4 * channels, out_dim=channels)
        self.time_mixer = AlphaBlender()
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x, context, num_frames: int):  # x: (N, C, H, W), context: (N, S, Dc)
        N, C, H, W = x.shape
        B, Fr, L = N // num_frames, num_frames, H * W
        # The temporal branch attends to the context of frame 0 of each video, at every pixel.
        ctx_t = context[::Fr].repeat_interleave(L, dim=0)                # (B*L, S, Dc)
        h = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(N, L, C))  # (N, L, C)
        # The temporal branch sees a sinusoidal frame-index embedding, computed on all N rows
        # (0..F-1, B times) as diffusers does: a matmul over F rows could round differently.
        frame_ids = torch.arange(Fr, device=x.device).repeat(B)          # 0..F-1, B times
        pos = self.time_pos_embed(timestep_embedding(frame_ids, C).to(h.dtype))  # (N, C)
        for block, temporal_block in zip(self.transformer_blocks, self.temporal_transformer_blocks):
            h = block(h, context)                                           # (N, L, C)
            m = (h + pos[:, None]).view(B, Fr, L, C).transpose(1, 2)       # (B, L, F, C)
            m = temporal_block(m.reshape(B * L, Fr, C), ctx_t)             # per pixel, over F
            m = m.view(B, L, Fr, C).transpose(1, 2).reshape(N, L, C)       # back per frame
            h = self.time_mixer(h, m)                                       # learned alpha
        h = self.proj_out(h).view(N, H, W, C).permute(0, 3, 1, 2)          # (N, C, H, W)
        return h.contiguous() + x

class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, plus a skip: 3x3 convs per frame, or (3, 1, 1) in time."""
    def __init__(self, cin, cout, temb_dim: int | None, eps: float, groups=32, temporal=False):
        super().__init__()
        # diffusers' ResnetBlock2D on frames x: (N, Cin, H, W), emb: (N, D), or TemporalResnetBlock
        # on clips x: (B, C, F, H, W), emb: (B, F, D): GroupNorm pools (C/32, F, H, W) per video,
        # the (3, 1, 1) convs see the frames before and after (zeros beyond the clip's ends).
        conv, kernel, pad = (nn.Conv3d, (3, 1, 1), (1, 0, 0)) if temporal else (nn.Conv2d, 3, 1)
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = conv(cin, cout, kernel, padding=pad)
        self.time_emb_proj = nn.Linear(temb_dim, cout) if temb_dim else None  # none in the VAE
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = conv(cout, cout, kernel, padding=pad)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, emb=None):
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:  # + (N, C, 1, 1), or (B, C, F, 1, 1) in time
            h = h + self.time_emb_proj(F.silu(emb)).movedim(-1, 1)[..., None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h

class SpatioTemporalResBlock(nn.Module):
    """A 2D ResNet block per frame, then a temporal ResNet block, blended by a learned alpha."""
    def __init__(self, cin: int, cout: int, temb_dim: int, eps: float):
        super().__init__()
        self.spatial_res_block = ResnetBlock(cin, cout, temb_dim, eps)
        self.temporal_res_block = ResnetBlock(cout, cout, temb_dim, eps, temporal=True)
        self.time_mixer = AlphaBlender()

    def forward(self, x, emb, num_frames: int):  # x: (N, Cin, H, W), emb: (N, D)
        xs = self.spatial_res_block(x, emb)                              # (N, C, H, W)
        B = xs.shape[0] // num_frames
        s = xs.view(B, num_frames, *xs.shape[1:]).transpose(1, 2)        # (B, C, F, H, W) view
        t = self.temporal_res_block(s, emb.view(B, num_frames, -1))      # (B, C, F, H, W)
        return self.time_mixer(s, t).transpose(1, 2).reshape(xs.shape)   # (N, C, H, W)

class Resample2D(nn.Module):
    """diffusers' Downsample2D, a stride-2 3x3 conv (the VAE's padding=0 pads right and bottom by
    one first), or Upsample2D: nearest 2x (or to a size: 2 -> 4 -> 7 -> 14), then a 3x3 conv."""
    def __init__(self, channels: int, up=False, padding: int = 1):
        super().__init__()
        self.up, self.padding = up, padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=1 if up else 2, padding=padding)

    def forward(self, x, size=None):
        if self.up:
            x = F.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest")
        elif self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)

# --- the UNet ----------------------------------------------------------------------------------
class UNetSpatioTemporal(nn.Module):
    """diffusers' UNetSpatioTemporalConditionModel: the denoiser of EchoNet-Synthetic's LVDM."""
    class_name = "UNetSpatioTemporalConditionModel"

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        n = len(c.block_out_channels)
        kinds = {XDOWN: True, DOWN: False, XUP: True, UP: False}  # name -> with attention
        downs, ups, ch, layers, heads, context, tlayers = (per_block(v, n) for v in (
            c.down_block_types, c.up_block_types, c.block_out_channels, c.layers_per_block,
            c.num_attention_heads, c.cross_attention_dim, c.transformer_layers_per_block))
        if unknown := [name for name in downs + ups if name not in kinds]:
            raise ValueError(f"unsupported block type {unknown[0]!r}; supported: {sorted(kinds)}")
        D = 4 * ch[0]  # time embedding width

        def block(j, cins, eps, attention, n_attention=None):
            """Level j's block, a container with diffusers' names: a SpatioTemporalResBlock (to
            ch[j]) per input width in cins, each followed by a TransformerSpatioTemporal if
            attention, whose transformer layers per module are one int or a list."""
            b = nn.Module()
            b.attentions = nn.ModuleList([TransformerSpatioTemporal(ch[j], heads[j], d, context[j])
                for d in per_block(tlayers[j], n_attention or len(cins))] if attention else [])
            b.resnets = nn.ModuleList([SpatioTemporalResBlock(cin, ch[j], D, eps) for cin in cins])
            return b

        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], D)
        self.add_embedding = TimestepEmbedding(c.projection_class_embeddings_input_dim, D)
        self.down_blocks = nn.ModuleList()
        self.up_blocks = nn.ModuleList()  # registered before mid_block: diffusers' key order
        for i, kind in enumerate(downs):  # level i, highest resolution first
            # diffusers' GroupNorm eps quirk, reproduced: 1e-6 in the blocks with attention, 1e-5
            # in those without (the UNet's resnet_eps argument is ignored by both)
            cins = [ch[max(i - 1, 0)]] + [ch[i]] * (layers[i] - 1)
            b = block(i, cins, 1e-6 if kinds[kind] else 1e-5, kinds[kind])
            b.downsamplers = nn.ModuleList([Resample2D(ch[i])]) if i < n - 1 else None
            self.down_blocks.append(b)
        # The middle: ResNet, attention, ResNet at the lowest resolution (eps 1e-5)
        self.mid_block = block(n - 1, [ch[-1]] * 2, 1e-5, True, n_attention=1)
        for i, kind in enumerate(ups):
            j, m = n - 1 - i, layers[n - 1 - i] + 1  # the level, lowest first; one ResNet more
            # ResNet k takes the running features (the level below's, then its own) plus a skip
            # (its own width, the last one the level above's); eps 1e-6
            cins = [(ch[min(j + 1, n - 1)] if k == 0 else ch[j]) + (ch[max(j - 1, 0)]
                    if k == m - 1 else ch[j]) for k in range(m)]
            b = block(j, cins, 1e-6, kinds[kind])
            b.upsamplers = nn.ModuleList([Resample2D(ch[j], up=True)]) if j > 0 else None
            self.up_blocks.append(b)
        self.conv_norm_out = nn.GroupNorm(32, ch[0], eps=1e-5)
        self.conv_out = nn.Conv2d(ch[0], c.out_channels, 3, padding=1)
        self.gradient_checkpointing = False

    def set_gradient_checkpointing(self, enabled: bool = True):
        """Recompute each ResNet and attention module in the backward pass to save memory."""
        self.gradient_checkpointing = enabled

    def unused_with_one_token(self):
        """Parameters that get no gradient when encoder_hidden_states has one token (EchoNet)."""
        # Each cross-attention's norm2, to_q and to_k (see Attention). The trainer freezes them
        # so DDP needs no unused-parameter search; they stay in the checkpoints, key for key.
        return [p for b in self.modules() if isinstance(b, TransformerBlock)
                for m in (b.norm2, b.attn2.to_q, b.attn2.to_k) for p in m.parameters()]

    def layer(self, block, k, x, emb, context, num_frames):
        """ResNet k of a block, then its attention module k if it has one (x: (N, C, H, W));
        with gradient checkpointing each is recomputed in the backward pass instead of kept."""
        # (the mid block has two ResNets and one attention module, after ResNet 0)
        for module, arg in zip([block.resnets[k], *block.attentions[k:k + 1]], (emb, context)):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(module, x, arg, num_frames, use_reentrant=False)
            else:
                x = module(x, arg, num_frames)
        return x

    def forward(self, sample, timestep, encoder_hidden_states, added_time_ids):
        """sample [B, F, Cin, H, W] (any F, H, W), timestep (a number, 0-dim or [B]),
        encoder_hidden_states [B, S, Dc], added_time_ids [B, n_ids] -> [B, F, Cout, H, W]."""
        B, Fr = sample.shape[:2]
        timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(B)

        # Time embedding plus the embedding of the added time ids. EchoNet passes one id with a
        # 1-wide sinusoid, which is all zeros: the ids have no effect, only add_embedding's biases.
        emb = self.time_embedding(timestep_embedding(timestep, self.config.block_out_channels[0])
                                  .to(sample.dtype))                                 # (B, D)
        ids = timestep_embedding(added_time_ids.flatten(), self.config.addition_time_embed_dim)
        emb = emb + self.add_embedding(ids.reshape(B, -1).to(emb.dtype))            # (B, D)

        # Fold frames into the batch: every 2D layer treats the N = B*F frames independently.
        x = self.conv_in(sample.flatten(0, 1))                                       # (N, C, H, W)
        emb = emb.repeat_interleave(Fr, dim=0)                                       # (N, D)
        args = emb, encoder_hidden_states.repeat_interleave(Fr, dim=0), Fr  # context (N, S, Dc)

        # Down: each ResNet [+ attention] output is a skip, and so is each stride-2 conv's.
        skips = [x]
        for block in self.down_blocks:
            for k in range(len(block.resnets)):
                x = self.layer(block, k, x, *args)                           # (N, C, H, W)
                skips.append(x)
            if block.downsamplers is not None:
                x = block.downsamplers[0](x)                                 # (N, C, H/2, W/2)
                skips.append(x)
        for k in range(2):  # the middle: ResNet + attention, then a ResNet alone
            x = self.layer(self.mid_block, k, x, *args)
        # Up: each ResNet takes the last skip, concatenated after the running features.
        for block in self.up_blocks:
            for k in range(len(block.resnets)):
                x = self.layer(block, k, torch.cat([x, skips.pop()], dim=1), *args)
            if block.upsamplers is not None:  # to the next skip's size (2x where sizes divide)
                x = block.upsamplers[0](x, skips[-1].shape[2:])
        x = self.conv_out(F.silu(self.conv_norm_out(x)))                   # (N, Cout, H, W)
        return x.reshape(B, Fr, *x.shape[1:])                              # (B, F, Cout, H, W)

# --- the autoencoder ---------------------------------------------------------------------------
class DiagonalGaussian:
    """The encoder's posterior q(z | x) = N(mean, std^2) (Kingma & Welling 2014)."""
    def __init__(self, moments: torch.Tensor):  # moments: (B, 2 * latent, h, w)
        self.moments = moments
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator=None) -> torch.Tensor:
        """mean + std * eps, eps ~ N(0, I) drawn as diffusers' randn_tensor (diffusion.randn) on
        the generator's device: None, one generator, or one per batch item (each its own)."""
        gens = generator if isinstance(generator, list) else [generator]
        shape = self.mean.shape if len(gens) == 1 else (1, *self.mean.shape[1:])
        eps = torch.cat([torch.randn(shape, generator=g, dtype=self.mean.dtype,
                                     device=self.mean.device if g is None else g.device)
                         for g in gens])
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per item, summed over latent elements: [B]."""
        return 0.5 * torch.sum(self.mean**2 + self.logvar.exp() - 1.0 - self.logvar, dim=[1, 2, 3])

class VAEAttention(Attention):
    """Single-head self-attention over the h*w positions of a feature map, plus a residual."""
    def forward(self, x):  # x: (B, C, h, w)
        B, C, h, w = x.shape
        # GroupNorm first, on the (B, C, h*w) view as in diffusers: on a channels-last x (the
        # encoder's output is one) the 4D GroupNorm kernel would round differently.
        t = self.group_norm(x.view(B, C, h * w)).transpose(1, 2)        # (B, h*w, C)
        return super().forward(t).transpose(1, 2).reshape(B, C, h, w) + x

class VAEMidBlock(nn.Module):
    """ResNet, optional self-attention, ResNet at the VAE's lowest resolution."""
    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        # One single-head attention, or none: an empty Sequential (no keys) passes x through.
        # Built either way, so that a seed draws the same weights for what follows as before.
        one_head = VAEAttention(channels, 1, bias=True, groups=groups)
        self.attentions = nn.Sequential(one_head) if attention else nn.Sequential()
        self.resnets = nn.ModuleList(
            [ResnetBlock(channels, channels, None, 1e-6, groups) for _ in range(2)])

    def forward(self, x):
        return self.resnets[1](self.attentions(self.resnets[0](x)))

class VAEBlock(nn.Module):
    """Encoder (DownEncoderBlock2D) or decoder (UpDecoderBlock2D) block: ResNets + resampling."""
    def __init__(self, cin, cout, num_layers, groups, down=False, up=False):
        super().__init__()
        self.resnets = nn.Sequential(
            *[ResnetBlock(cin if i == 0 else cout, cout, None, 1e-6, groups)
              for i in range(num_layers)])
        # one, the other or neither: an empty Sequential (no keys) passes x through
        self.downsamplers = nn.Sequential(*[Resample2D(cout, padding=0)] if down else [])
        self.upsamplers = nn.Sequential(*[Resample2D(cout, up=True)] if up else [])

    def forward(self, x):  # x: (B, Cin, H, W) -> (B, C, H, W), or at half or twice the size
        return self.upsamplers(self.downsamplers(self.resnets(x)))

class AutoencoderKL(nn.Module):
    """diffusers' AutoencoderKL: encode(x) -> DiagonalGaussian posterior, decode(z) -> image."""
    class_name = "AutoencoderKL"

    def __init__(self, config: VAEConfig):
        super().__init__()
        c = self.config = config
        ch, g, k = c.block_out_channels, c.norm_num_groups, c.latent_channels
        kinds, n = (tuple(c.down_block_types), tuple(c.up_block_types), c.act_fn), len(ch)
        if kinds != (("DownEncoderBlock2D",) * n, ("UpDecoderBlock2D",) * n, "silu"):
            raise ValueError(f"unsupported VAE {kinds}: this one has DownEncoderBlock2D, "
                             "UpDecoderBlock2D (one per block_out_channels entry) and silu only")
        # Encoder (a container with diffusers' names): image -> a block per resolution, all but
        # the last halving it -> mid block -> moments. The decoder mirrors it, one ResNet longer.
        self.encoder = e = nn.Module()
        e.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        e.down_blocks = nn.Sequential(
            *[VAEBlock(ch[max(i - 1, 0)], ch[i], c.layers_per_block, g, down=i < n - 1)
              for i in range(n)])
        e.mid_block = VAEMidBlock(ch[-1], g, c.mid_block_add_attention)
        e.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        e.conv_out = nn.Conv2d(ch[-1], 2 * k, 3, padding=1)
        self.decoder = d = nn.Module()
        rch = ch[::-1]  # lowest resolution first
        d.conv_in = nn.Conv2d(k, rch[0], 3, padding=1)
        d.up_blocks = nn.Sequential(  # registered before mid_block: diffusers' key order
            *[VAEBlock(rch[max(i - 1, 0)], rch[i], c.layers_per_block + 1, g, up=i < n - 1)
              for i in range(n)])
        d.mid_block = VAEMidBlock(rch[0], g, c.mid_block_add_attention)
        d.conv_norm_out = nn.GroupNorm(g, rch[-1], eps=1e-6)
        d.conv_out = nn.Conv2d(rch[-1], c.out_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(2 * k, 2 * k, 1) if c.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(k, k, 1) if c.use_post_quant_conv else None

    def encode(self, x) -> DiagonalGaussian:
        """x [B, 3, H, W] in [-1, 1] -> posterior over z [B, latent, H / 8, W / 8] (4 blocks);
        the UNet works on z * config.scaling_factor (divide by it again before decoding)."""
        e = self.encoder
        x = e.mid_block(e.down_blocks(e.conv_in(x)))                     # (B, C, h, w)
        moments = e.conv_out(F.silu(e.conv_norm_out(x)))                 # (B, 2 * latent, h, w)
        return DiagonalGaussian(moments if self.quant_conv is None else self.quant_conv(moments))

    def decode(self, z) -> torch.Tensor:
        """z [B, latent, h, w] (already divided by scaling_factor) -> image [B, 3, H, W]."""
        d = self.decoder
        z = z if self.post_quant_conv is None else self.post_quant_conv(z)
        x = d.up_blocks(d.mid_block(d.conv_in(z)))                      # (B, C, H, W)
        return d.conv_out(F.silu(d.conv_norm_out(x)))

    def forward(self, x, sample_posterior: bool = False, generator=None):
        """Reconstruction: decode(mode) or decode(sample) of encode(x), and the posterior."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

# --- model folders and training checkpoints ---------------------------------------------------
# A model folder (published, or written by export.py): config.json with diffusers' fields and
# _class_name, plus the weights. A training checkpoint: train.py's <run>/checkpoint-<step>/.

DIFFUSERS_VERSION = "0.42.1"  # the version whose maths and key names we match
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_NAME_BIN = "diffusion_pytorch_model.bin"
CLASSES = {cls.class_name: (cls, cfg) for cls, cfg in
           [(UNetSpatioTemporal, UNetConfig), (AutoencoderKL, VAEConfig)]}
CHECKPOINT_FILES = ("model.pt", "ema.pt", "optimizer.pt", "scaler.pt", "trainer.pt",
                    "model_config.json", "training_config.json")

class ModelLoadError(Exception):
    """A model folder or checkpoint that cannot be loaded: the message names the file and why."""

def torch_load(path: str, **kw):
    """The tensors of a .safetensors file, or torch.load(path, weights_only=True) on the CPU:
    tensors, numbers, strings and containers of them, never arbitrary objects (pickles run
    code). ModelLoadError names a bad file."""
    try:
        if path.endswith(".safetensors"):
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True, **kw)
    except Exception as e:  # a missing file, a foreign pickle, a truncated zip, random bytes
        why = str(e).splitlines()[0] if "Weights only" not in str(e) else "not plain tensors"
        raise ModelLoadError(f"{path}: unreadable ({why})") from None

def config_to_dict(model: nn.Module) -> dict:
    """The config.json diffusers writes: every field, lists for tuples, plus the class name."""
    d = {k: list(v) if isinstance(v, tuple) else v
         for k, v in dataclasses.asdict(model.config).items()}
    return {"_class_name": model.class_name, "_diffusers_version": DIFFUSERS_VERSION, **d}

def save_pretrained(model: nn.Module, path: str):
    """Write path/config.json + path/diffusion_pytorch_model.safetensors (diffusers loads it)."""
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    config = json.dumps(config_to_dict(model), indent=2, sort_keys=True) + "\n"
    os.makedirs(path, exist_ok=True)
    tmp = os.path.join(path, ".tmp")  # each file is written whole, then renamed into place
    for name, content in [(WEIGHTS_NAME, save(tensors, metadata={"format": "pt"})),
                          ("config.json", config.encode())]:
        with open(tmp, "wb") as f:  # open() gives the umask's permissions (save_file's are 0600)
            f.write(content)
        os.replace(tmp, os.path.join(path, name))

# As in diffusers, each model class has it as a method: unet.save_pretrained(path).
UNetSpatioTemporal.save_pretrained = AutoencoderKL.save_pretrained = save_pretrained

def build(config_file: str, expect: str | None = None) -> nn.Module:
    """The model (random weights) a config.json describes: unknown keys ignored (the published
    UNet's carries EMA bookkeeping), missing ones diffusers' defaults (the dataclass's)."""
    try:
        with open(config_file) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{config_file}: not valid JSON ({e})") from e
    name = d.get("_class_name") if isinstance(d, dict) else None
    if name not in CLASSES:
        raise ModelLoadError(f"{config_file}: unknown _class_name {name!r}; "
                             f"expected one of {sorted(CLASSES)}")
    if expect not in (None, name):
        raise ModelLoadError(f"{config_file}: this folder holds a {name}, expected a {expect}")
    cls, config_cls = CLASSES[name]
    try:
        return cls(config_cls(**{k: tuple(v) if isinstance(v, list) else v
                                 for k, v in d.items() if k in config_cls.__dataclass_fields__}))
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{config_file}: invalid configuration ({e})") from e

def load_weights(model: nn.Module, state, source: str, config_file: str) -> nn.Module:
    """model with the state dict `state` loaded strictly, in eval mode; ModelLoadError names the
    weights file and the missing, unexpected and misshapen keys (the first eight of each)."""
    state, expected = state if isinstance(state, dict) else {}, model.state_dict()
    wrong = [f"{k} {list(v.shape) if torch.is_tensor(v) else type(v).__name__} "
             f"(model: {list(expected[k].shape)})" for k, v in state.items()
             if k in expected and not (torch.is_tensor(v) and v.shape == expected[k].shape)]
    problems = {"missing keys": expected.keys() - state.keys(),
                "unexpected keys": state.keys() - expected.keys(), "wrong shapes": wrong}
    report = "; ".join(f"{what}: {', '.join(sorted(keys)[:8])}" + (
        f" ... and {len(keys) - 8} more" if len(keys) > 8 else "")
        for what, keys in problems.items() if keys)
    if report:
        raise ModelLoadError(f"{source} does not match the {model.class_name} of {config_file}: "
                             + report)
    model.load_state_dict(state)
    return model.eval()

def load_model(path: str, expect: str | None = None) -> nn.Module:
    """The UNet or VAE of a diffusers-format model folder, loaded strictly from its safetensors
    (or a .bin, weights_only); `expect`, a _class_name, refuses a folder of the other class."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ModelLoadError(f"{path}: " + ("no config.json in the model folder"
                                            if os.path.isdir(path) else "model folder not found"))
    model = build(config_file, expect)
    for file in (os.path.join(path, f) for f in (WEIGHTS_NAME, WEIGHTS_NAME_BIN)):
        if os.path.isfile(file):
            return load_weights(model, torch_load(file), file, config_file)
    raise ModelLoadError(f"{path}: no weights found (no {WEIGHTS_NAME} or {WEIGHTS_NAME_BIN})")

def remove_folder(path: str):
    """Deletes a folder renamed .tmp-removed-<name> first: a crash never leaves a half-deleted
    folder under its real name (train.py deletes .tmp-* folders when it starts)."""
    tmp = os.path.join(os.path.dirname(path), ".tmp-removed-" + os.path.basename(path))
    os.replace(path, tmp)
    shutil.rmtree(tmp)

def save_checkpoint(run: str, step: int, files: dict, keep: int):
    """Writes <run>/checkpoint-<step>/ from {name: value} (model, ema = {"step", "max_decay",
    "model"}, optimizer, scaler, trainer as .pt; *_config as .json) under a temporary name, then
    renamed, so a checkpoint-<step> is complete; then deletes all but the newest `keep`."""
    tmp, final = (os.path.join(run, f"{p}checkpoint-{step}") for p in (".tmp-", ""))
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name, value in files.items():
        if name.endswith("_config"):
            with open(os.path.join(tmp, name + ".json"), "w") as f:
                json.dump(value, f, indent=2)
        else:
            torch.save(value, os.path.join(tmp, name + ".pt"))
    if os.path.exists(final):  # only when the same step is saved again
        remove_folder(final)
    os.replace(tmp, final)
    for _, old in list_checkpoints(run)[:-keep]:
        remove_folder(old)

def list_checkpoints(run: str) -> list:
    """[(step, path)] of a run folder's checkpoint-<step>/ folders holding all CHECKPOINT_FILES,
    by step (newest last), not by modification time, which a copy scrambles."""
    names = os.listdir(run) if os.path.isdir(run) else []
    found = [(int(n[11:]), os.path.join(run, n)) for n in names
             if n.startswith("checkpoint-") and n[11:].isdigit()]
    return sorted((step, path) for step, path in found
                  if all(os.path.isfile(os.path.join(path, f)) for f in CHECKPOINT_FILES))

def load_checkpoint(path: str) -> tuple[nn.Module, str]:
    """(module in eval mode, checkpoint folder): a checkpoint's UNet or VAE with its EMA weights
    (as the original exported); a run folder: its highest step's."""
    if not any(os.path.isfile(os.path.join(path, f)) for f in CHECKPOINT_FILES):  # a run folder
        found = list_checkpoints(path)
        if not found:
            raise ModelLoadError(f"{path}: no complete checkpoint-<step>/ folder in it (train "
                                 "first, or name a training run folder or one of its checkpoints)")
        path = found[-1][1]
    missing = [f for f in CHECKPOINT_FILES if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise ModelLoadError(f"{path}: an incomplete checkpoint (no {', '.join(missing)})")
    file, config_file = (os.path.join(path, f) for f in ("ema.pt", "model_config.json"))
    state = torch_load(file)  # {"step", "max_decay", "model"}
    state = state["model"] if isinstance(state, dict) and "model" in state else state
    return load_weights(build(config_file), state, file, config_file), path

def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

if __name__ == "__main__":  # the VAE preset: "echonet" with the lvdm UNet, else the same name
    parser = argparse.ArgumentParser(description="Smoke run: build a preset, one forward pass.")
    parser.add_argument("--preset", default="tiny", choices=sorted(UNET_PRESETS))
    preset = parser.parse_args().preset
    torch.manual_seed(0)
    unet = UNetSpatioTemporal(UNET_PRESETS[preset]).eval()
    vae = AutoencoderKL(VAE_PRESETS["echonet" if preset == "lvdm" else preset]).eval()
    with torch.no_grad():  # 8 frames of noisy latents + the conditioning frame; t = 500, EF 55 %
        v = unet(torch.randn(1, 8, 8, 14, 14), 500, torch.full((1, 1, 1), 0.55), torch.zeros(1, 1))
        z = vae.encode(torch.rand(2, 3, 112, 112) * 2 - 1).sample()     # frames in [-1, 1]
        print(f"UNet {preset}: {count_parameters(unet):,} parameters, [1, 8, 8, 14, 14] -> "
              f"{list(v.shape)}\nVAE: {count_parameters(vae):,} parameters, [2, 3, 112, 112] -> "
              f"{list(z.shape)} -> {list(vae.decode(z).shape)}")
