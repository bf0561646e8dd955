"""The two networks of EchoNet-Synthetic's latent video diffusion model, written out in PyTorch.

- `UNetSpatioTemporal`: the Stable Video Diffusion UNet (diffusers'
  `UNetSpatioTemporalConditionModel`) that EchoNet-Synthetic's LVDM trains: 2D ResNet + spatial
  attention blocks from Stable Diffusion, each followed by a temporal ResNet / temporal attention
  branch and a learned mix of the two.
- `AutoencoderKL`: the KL autoencoder (VAE) of latent diffusion that maps 112x112 echo frames to
  4x14x14 latents and back.

Both load the published diffusers-format folders (`config.json` + safetensors) key for key and
compute what diffusers computes (tests/test_model.py checks it to 1e-5 in fp32).

    python model.py                  # smoke run: build the "tiny" presets, one forward pass each
    python model.py --preset lvdm    # the paper's UNet (143.8 M parameters)

References:
  Reynaud et al. 2024, "EchoNet-Synthetic: Privacy-preserving video generation for safe medical
    data sharing" (the LVDM and its configuration).
  Blattmann et al. 2023, "Stable Video Diffusion" and "Align your Latents" (the spatio-temporal
    UNet: spatial layers interleaved with temporal layers, mixed by a learned alpha).
  Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models" (the VAE).
  Vaswani et al. 2017 (attention); Shazeer 2020, "GLU Variants Improve Transformer" (GEGLU).

Shape legend: B batch, F frames, N = B*F frames folded into the batch, C channels, H/W latent
height/width, L = H*W tokens of a frame, D width of the time embedding. `t` is diffusion time.
Module attribute names are diffusers' (so state-dict keys match the checkpoints); clarity lives in
class names, docstrings and shape comments instead.
"""

import argparse
import dataclasses
import json
import math
import os
import shutil
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint

DIFFUSERS_VERSION = "0.42.1"  # the version whose maths and key names we match
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_NAME_BIN = "diffusion_pytorch_model.bin"


class ModelLoadError(Exception):
    """A model folder that cannot be loaded: the message names the file and what is wrong."""


# --- config ------------------------------------------------------------------------------------
# Field names and defaults are diffusers' (a config.json missing a field takes diffusers' default);
# the EchoNet-Synthetic values are the presets at the end of the file.

@dataclass
class UNetConfig:
    sample_size: int | None = None        # latent size at training (forward does not read it)
    in_channels: int = 8                  # 4 noisy latent channels + 4 of the conditioning frame
    out_channels: int = 4                 # the prediction (v in EchoNet-Synthetic)
    down_block_types: tuple = (("CrossAttnDownBlockSpatioTemporal",) * 3
                               + ("DownBlockSpatioTemporal",))
    up_block_types: tuple = ("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * 3
    block_out_channels: tuple = (320, 640, 1280, 1280)  # channels per resolution
    addition_time_embed_dim: int = 256    # sinusoid width per added time id
    projection_class_embeddings_input_dim: int = 768  # = addition_time_embed_dim * number of ids
    layers_per_block: int | tuple = 2     # ResNets per down block (up blocks get one more)
    cross_attention_dim: int | tuple = 1024  # width of encoder_hidden_states tokens (1: the EF)
    transformer_layers_per_block: int | tuple = 1  # transformer layers in each attention module
    num_attention_heads: int | tuple = (5, 10, 20, 20)  # heads per resolution
    num_frames: int = 25                  # frames the model was trained on (not used by forward)


@dataclass
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


def per_block(value, n: int) -> list:
    """An int (or other scalar) repeated n times, or a per-block list checked to have n entries."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"expected {n} per-block values, got {list(value)}")
        return list(value)
    return [value] * n


# --- building blocks ---------------------------------------------------------------------------

def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [len(t), dim], cosines first (diffusers' flip_sin_to_cos=True, shift 0).

    freq_k = 10000^(-k / half) for k < half = dim // 2 (Vaswani et al. 2017, Sec. 3.5); computed in
    float32 in the same order as diffusers so that results match bit for bit. An odd dim gets a
    zero column: with dim = 1 (EchoNet's added time ids) the embedding is all zeros.
    """
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    arg = t[:, None].float() * torch.exp(exponent)[None, :]  # (len(t), half)
    emb = torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)
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
    """out = a * x_spatial + (1 - a) * x_temporal with a = sigmoid(mix_factor), learned (init 0.5).

    diffusers' "learned_with_images" strategy sets a = 1 for frames flagged as still images; the
    UNet never flags any, so a is always sigmoid(mix_factor).
    """

    def __init__(self, alpha: float = 0.5):
        super().__init__()
        self.mix_factor = nn.Parameter(torch.tensor([alpha]))

    def forward(self, x_spatial, x_temporal):
        a = torch.sigmoid(self.mix_factor).to(x_spatial.dtype)
        return Blend.apply(a, x_spatial, x_temporal)


class Blend(torch.autograd.Function):
    """a * x + (1 - a) * y for a one-element a, with a's gradient taken as two dot products.

    Autograd's backward would form both products with the incoming gradient and sum them.
    """

    @staticmethod
    def forward(ctx, a, x, y):
        ctx.save_for_backward(a, x, y)
        return add_residual(a * x, (1.0 - a) * y)

    @staticmethod
    def backward(ctx, grad):
        a, x, y = ctx.saved_tensors
        ga = None
        if ctx.needs_input_grad[0]:
            ga = (dot(grad, x) - dot(grad, y)).reshape(a.shape).to(a.dtype)
        return ga, grad * a, grad * (1.0 - a)


def dot(u, v):
    """sum(u * v) over all elements, without the product tensor when both are contiguous."""
    if u.is_contiguous() and v.is_contiguous() and u.dtype == v.dtype:
        return torch.dot(u.view(-1), v.view(-1))
    return (u * v).sum()


def add_residual(branch, h):
    """branch + h, summed in place into `branch` when that keeps the dtype of `branch + h`.

    `branch` is always a fresh output that autograd does not keep, so this saves allocating one
    more activation; the sums are the same numbers. Under autocast a bf16 branch plus an fp32
    stream must promote, as in diffusers, and takes the ordinary path.
    """
    if torch.promote_types(branch.dtype, h.dtype) == branch.dtype:
        return branch.add_(h)
    return branch + h


class SingleKeyAttention(torch.autograd.Function):
    """h + to_out(v) at every query: cross-attention to a context of one token, plus residual.

    Softmax over a single key is exactly 1, so every query of h [B*L, C] (B sequences of L
    tokens) receives its sequence's value v = to_v(context) [B, 1, Ci]: to_q, to_k and the
    attention itself are skipped. The forward applies to_out to all L copies of v, as diffusers
    does to the attention output, so results round identically; the backward needs only the sum
    over the L rows (two [B, Ci] matmuls instead of two [B*L, Ci] ones), and nothing of size L
    is kept for it.
    """

    @staticmethod
    def forward(ctx, v, h, weight, bias):  # v: (B, 1, Ci), h: (B*L, C)
        ctx.save_for_backward(v, weight)
        B, L = v.shape[0], h.shape[0] // v.shape[0]
        out = F.linear(v.expand(B, L, -1).reshape(B * L, -1), weight, bias)  # (B*L, C)
        ctx.dtype = out.dtype  # the compute dtype, bf16/fp16 under autocast
        return add_residual(out, h)

    @staticmethod
    def backward(ctx, grad):  # grad: (B*L, C)
        v, weight = ctx.saved_tensors
        g = grad.view(v.shape[0], -1, grad.shape[-1]).sum(1, keepdim=True).to(ctx.dtype)  # (B,1,C)
        w, x = weight.to(ctx.dtype), v.to(ctx.dtype)
        gv = (g @ w).to(v.dtype) if ctx.needs_input_grad[0] else None     # (B, 1, Ci)
        gw = None
        if ctx.needs_input_grad[2]:
            gw = (g.flatten(0, 1).T @ x.flatten(0, 1)).to(weight.dtype)    # (C, Ci)
        gb = g.sum((0, 1)).to(weight.dtype) if ctx.needs_input_grad[3] else None
        return gv, grad, gw, gb


class Attention(nn.Module):
    """Multi-head attention (Vaswani et al. 2017) within sequences of L tokens, or to a context.

    Tokens come flat, [B*L, C] (so every Linear returns a plain 2D tensor that residual sums can
    be added into); the blocks call it through `cross_attention` below, which takes a shortcut
    for a context of one token.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None,
                 bias: bool = False):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])  # diffusers' to_out.1 is Dropout(0)

    def forward(self, x, L: int, context=None):  # x: (B*L, C), context: (B, S, Dc) or None
        B = x.shape[0] // L
        q = self.to_q(x).view(B, L, self.heads, -1).transpose(1, 2)  # (B, heads, L, head_dim)
        context = x.view(B, L, -1) if context is None else context
        k = self.to_k(context).view(B, context.shape[1], self.heads, -1).transpose(1, 2)
        v = self.to_v(context).view(B, context.shape[1], self.heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head_dim)
        out = out.transpose(1, 2).reshape(B * L, -1).to(q.dtype)  # (B*L, heads*head_dim)
        return self.to_out[0](out)

    def unused_with_one_token(self):
        """Parameters that cannot affect the output when the context is a single token."""
        return [*self.to_q.parameters(), *self.to_k.parameters()]


def cross_attention(norm, attn, h, L: int, context):
    """h + attn(norm(h), context); with one context token neither norm nor queries matter."""
    if context.shape[1] == 1:
        out = attn.to_out[0]
        return SingleKeyAttention.apply(attn.to_v(context), h, out.weight, out.bias)
    return add_residual(attn(norm(h), L, context), h)


class GatedGELU(torch.autograd.Function):
    """[value | gate] -> value * GELU(gate), with both halves' gradients written into one buffer.

    The forward is the plain chunk, gelu and multiply. Autograd's backward for that would build
    the two half-gradients separately and then concatenate them; here they go straight into
    their halves of one tensor (measured at [4096, 1024] on CPU: 3.0-3.2 ms instead of 4.1-4.7).
    """

    @staticmethod
    def forward(ctx, proj):  # proj: (..., 2 * inner)
        value, gate = proj.chunk(2, dim=-1)  # first half value, second half gate
        act = F.gelu(gate)
        ctx.save_for_backward(proj, act)
        return value * act

    @staticmethod
    def backward(ctx, grad):  # grad: (..., inner)
        proj, act = ctx.saved_tensors
        value, gate = proj.chunk(2, dim=-1)
        grad = grad.to(proj.dtype)  # a no-op unless autocast ran gelu in another dtype
        out = torch.empty_like(proj)
        grad_value, grad_gate = out.chunk(2, dim=-1)
        torch.mul(grad, act, out=grad_value)
        torch.mul(grad, value, out=grad_gate)  # d out / d GELU(gate), then through GELU in place
        torch.ops.aten.gelu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
        return out


class GEGLU(nn.Module):
    """Linear to 2x width, split into value and gate: value * GELU(gate) (Shazeer 2020)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        if torch.compiler.is_compiling():  # torch.compile fuses the plain ops by itself
            value, gate = self.proj(x).chunk(2, dim=-1)
            return value * F.gelu(gate)
        return GatedGELU.apply(self.proj(x))


class FeedForward(nn.Module):
    """GEGLU feed-forward, inner width 4x: net.0 = GEGLU, net.2 = output Linear."""

    def __init__(self, dim: int, dim_out: int | None = None):
        super().__init__()
        # index 1 is diffusers' Dropout(0); an Identity keeps the output layer at key "net.2"
        self.net = nn.ModuleList(
            [GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim_out or dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class SpatialTransformerBlock(nn.Module):
    """Pre-norm transformer layer over the L tokens of each frame: self-attn, cross-attn, GEGLU."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, h, L: int, context):  # h: (N*L, C), context: (N, S, context_dim)
        h = add_residual(self.attn1(self.norm1(h), L), h)
        h = cross_attention(self.norm2, self.attn2, h, L, context)
        return add_residual(self.ff(self.norm3(h)), h)


class TemporalTransformerBlock(nn.Module):
    """The same layer across the F frames at each spatial position, with a residual GEGLU first."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int):
        super().__init__()
        self.norm_in = nn.LayerNorm(dim)
        self.ff_in = FeedForward(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, m, Fr: int, context):  # m: (B*L*F, C), context: (B*L, S, context_dim)
        m = add_residual(self.ff_in(self.norm_in(m)), m)
        m = add_residual(self.attn1(self.norm1(m), Fr), m)  # attention over frames, no mask
        m = cross_attention(self.norm2, self.attn2, m, Fr, context)
        return add_residual(self.ff(self.norm3(m)), m)


class TransformerSpatioTemporal(nn.Module):
    """Attention module: spatial transformer per frame, temporal transformer per pixel, mixed.

    The temporal branch sees a sinusoidal frame-index embedding (through time_pos_embed); the
    spatial output and the temporal output are blended by a learned alpha (AlphaBlender).
    """

    def __init__(self, channels: int, heads: int, num_layers: int, context_dim: int):
        super().__init__()
        head_dim = channels // heads
        inner = heads * head_dim
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            [SpatialTransformerBlock(inner, heads, head_dim, context_dim)
             for _ in range(num_layers)])
        self.temporal_transformer_blocks = nn.ModuleList(
            [TemporalTransformerBlock(inner, heads, head_dim, context_dim)
             for _ in range(num_layers)])
        self.time_pos_embed = TimestepEmbedding(channels, 4 * channels, out_dim=channels)
        self.time_mixer = AlphaBlender()
        self.proj_out = nn.Linear(inner, channels)

    def forward(self, x, context, num_frames: int):  # x: (N, C, H, W), context: (N, S, Dc)
        N, C, H, W = x.shape
        B, Fr, L = N // num_frames, num_frames, H * W
        # The temporal branch attends to the context of frame 0 of each video, at every pixel.
        ctx_t = context.view(B, Fr, *context.shape[1:])[:, 0]            # (B, S, Dc)
        ctx_t = ctx_t[:, None].expand(B, L, *ctx_t.shape[1:]).reshape(B * L, *ctx_t.shape[1:])

        h = self.norm(x).permute(0, 2, 3, 1).reshape(N, L, C)            # (N, L, C), a strided view
        h = self.proj_in(h).reshape(N * L, -1)                           # (N*L, C): flat tokens
        # Frame-index embedding, computed on all N rows (0..F-1 repeated B times) as diffusers
        # does: the rows are equal, but a matmul over F rows would round differently.
        frame_ids = torch.arange(Fr, device=x.device).repeat(B)
        pos = self.time_pos_embed(timestep_embedding(frame_ids, C).to(h.dtype))[:, None]
        # pos: (N, 1, C)
        for block, temporal_block in zip(self.transformer_blocks, self.temporal_transformer_blocks):
            h = block(h, L, context)                                     # (N*L, C)
            m = (h.view(N, L, -1) + pos).view(B, Fr, L, -1)              # (B, F, L, C)
            m = m.permute(0, 2, 1, 3).reshape(B * L * Fr, -1)            # (B*L*F, C): per pixel
            m = temporal_block(m, Fr, ctx_t)
            m = m.view(B, L, Fr, -1).permute(0, 2, 1, 3).reshape(N * L, -1)  # back to (N*L, C)
            h = self.time_mixer(h, m)
        h = self.proj_out(h)                                             # (N*L, C)
        h = h.view(N, H, W, C).permute(0, 3, 1, 2).contiguous()          # (N, C, H, W)
        return add_residual(h, x)

    def unused_with_one_token(self):
        """Parameters the output ignores when the context is one token: norm2, to_q, to_k."""
        blocks = list(self.transformer_blocks) + list(self.temporal_transformer_blocks)
        return [p for b in blocks
                for p in [*b.norm2.parameters(), *b.attn2.unused_with_one_token()]]


class SmallFrameConv(torch.autograd.Function):
    """3x3 conv (padding 1) whose weight gradient is one GEMM over unfolded patches.

    Used on CPU for frames of at most 9 pixels (the UNet's 2x2 level), where oneDNN's
    weight-gradient kernel is several times slower than the equivalent GEMM (measured 5x at
    16 x 512 x 2 x 2). The forward and the input gradient are PyTorch's own.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):  # x: (N, Cin, H, W), weight: (Cout, Cin, 3, 3)
        out = F.conv2d(x, weight, bias, padding=1)
        ctx.save_for_backward(x, weight)
        ctx.dtype = out.dtype  # the compute dtype, bf16 under autocast
        return out

    @staticmethod
    def backward(ctx, grad):  # grad: (N, Cout, H, W)
        x, weight = ctx.saved_tensors
        N, Cin, H, W = x.shape
        x, w, grad = x.to(ctx.dtype), weight.to(ctx.dtype), grad.to(ctx.dtype)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.convolution_backward(
                grad, x, w, None, (1, 1), (1, 1), (1, 1), False, (0, 0), 1,
                (True, False, False))[0].to(x.dtype)
        g = grad.permute(0, 2, 3, 1).reshape(N * H * W, -1)                   # (N*H*W, Cout)
        if ctx.needs_input_grad[1]:
            cols = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(N * H * W, -1)  # (., Cin*9)
            gw = (g.T @ cols).view(weight.shape).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            gb = g.sum(0).to(weight.dtype)
        return gx, gw, gb


def conv3x3(conv: nn.Conv2d, x):
    """conv(x), through SmallFrameConv when training on CPU with frames of at most 9 pixels."""
    if (x.shape[-2] * x.shape[-1] <= 9 and x.device.type == "cpu" and torch.is_grad_enabled()
            and conv.weight.requires_grad):
        return SmallFrameConv.apply(x, conv.weight, conv.bias)
    return conv(x)


class ResnetBlock2D(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv, twice, plus a skip (1x1 conv if the width changes).

    With a time embedding (UNet), its projection is added between the two convs; the VAE has none.
    """

    def __init__(self, cin: int, cout: int, temb_dim: int | None, eps: float, groups: int = 32):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, cout) if temb_dim else None
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, emb=None):  # x: (N, Cin, H, W), emb: (N, D)
        h = conv3x3(self.conv1, F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = add_residual(h, self.time_emb_proj(F.silu(emb))[:, :, None, None])
        h = conv3x3(self.conv2, F.silu(self.norm2(h)))
        return add_residual(h, x if self.conv_shortcut is None else self.conv_shortcut(x))


class TemporalResnetBlock(nn.Module):
    """The ResNet block along time: GroupNorm over (C/32, F, H, W) per video, (3, 1, 1) convs.

    Frame 0 and frame F-1 see a zero frame beyond the clip (zero padding of one frame).
    """

    def __init__(self, channels: int, temb_dim: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(32, channels, eps=eps)
        self.conv1 = nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0))
        self.time_emb_proj = nn.Linear(temb_dim, channels)
        self.norm2 = nn.GroupNorm(32, channels, eps=eps)
        self.conv2 = nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, s, emb):  # s: (B, C, F, H, W), emb: (B, F, D)
        h = self.conv1(F.silu(self.norm1(s)))
        temb = self.time_emb_proj(F.silu(emb)).permute(0, 2, 1)[..., None, None]  # (B, C, F, 1, 1)
        h = add_residual(h, temb)
        h = self.conv2(F.silu(self.norm2(h)))
        return add_residual(h, s)


class SpatioTemporalResBlock(nn.Module):
    """A 2D ResNet block per frame, then a temporal ResNet block, blended by a learned alpha."""

    def __init__(self, cin: int, cout: int, temb_dim: int, eps: float):
        super().__init__()
        self.spatial_res_block = ResnetBlock2D(cin, cout, temb_dim, eps)
        self.temporal_res_block = TemporalResnetBlock(cout, temb_dim, eps)
        self.time_mixer = AlphaBlender()

    def forward(self, x, emb, num_frames: int):  # x: (N, Cin, H, W), emb: (N, D)
        xs = self.spatial_res_block(x, emb)                              # (N, C, H, W)
        N, C, H, W = xs.shape
        B = N // num_frames
        s = xs.view(B, num_frames, C, H, W).permute(0, 2, 1, 3, 4)       # (B, C, F, H, W) view
        t = self.temporal_res_block(s, emb.view(B, num_frames, -1))
        out = self.time_mixer(s, t)                                      # (B, C, F, H, W)
        return out.permute(0, 2, 1, 3, 4).reshape(N, C, H, W)


class Downsample2D(nn.Module):
    """3x3 conv with stride 2. padding=0 (the VAE) pads right and bottom by one pixel first."""

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x):
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))  # asymmetric, as in the original LDM autoencoder
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling (2x, or to an explicit size) followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size=None):
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


def run(module, checkpointed: bool, *args):
    """module(*args), with activation checkpointing when asked for and gradients are on."""
    if checkpointed and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


def attention_modules(channels, num_layers, attention):
    """One TransformerSpatioTemporal per ResNet, or None; attention = (heads, layers, context)."""
    if not attention:
        return None
    heads, layers, context_dim = attention
    return nn.ModuleList([TransformerSpatioTemporal(channels, heads, layers[i], context_dim)
                          for i in range(num_layers)])


class DownBlockSpatioTemporal(nn.Module):
    """Down block: (ResNet [+ attention]) x n, then an optional stride-2 conv; keeps the skips.

    diffusers' GroupNorm eps quirk, reproduced: the blocks with attention use 1e-6, those
    without 1e-5 (the UNet's resnet_eps argument is ignored by both).
    """

    def __init__(self, cin, cout, temb_dim, num_layers, add_downsample, attention=None):
        super().__init__()
        eps = 1e-6 if attention else 1e-5
        self.attentions = attention_modules(cout, num_layers, attention)  # registered first,
        self.resnets = nn.ModuleList(                                     # as in diffusers
            [SpatioTemporalResBlock(cin if i == 0 else cout, cout, temb_dim, eps)
             for i in range(num_layers)])
        self.downsamplers = nn.ModuleList([Downsample2D(cout)]) if add_downsample else None
        self.gradient_checkpointing = False

    def forward(self, x, emb, context, num_frames):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = run(resnet, self.gradient_checkpointing, x, emb, num_frames)
            if self.attentions is not None:
                x = run(self.attentions[i], self.gradient_checkpointing, x, context, num_frames)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlockSpatioTemporal(nn.Module):
    """Up block: (concat skip -> ResNet [+ attention]) x n, then optional upsample; eps 1e-6."""

    def __init__(self, cin, cprev, cout, temb_dim, num_layers, add_upsample, attention=None):
        super().__init__()
        self.attentions = attention_modules(cout, num_layers, attention)
        # resnet i takes the running features (cprev, then cout) plus a skip (cout, last one cin)
        self.resnets = nn.ModuleList(
            [SpatioTemporalResBlock((cprev if i == 0 else cout) + (cin if i == n - 1 else cout),
                                    cout, temb_dim, 1e-6)
             for i, n in enumerate([num_layers] * num_layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(cout)]) if add_upsample else None
        self.gradient_checkpointing = False

    def forward(self, x, skips, emb, context, num_frames, upsample_size=None):
        for i, resnet in enumerate(self.resnets):
            x = torch.cat([x, skips.pop()], dim=1)  # current features first, then the skip
            x = run(resnet, self.gradient_checkpointing, x, emb, num_frames)
            if self.attentions is not None:
                x = run(self.attentions[i], self.gradient_checkpointing, x, context, num_frames)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class UNetMidBlockSpatioTemporal(nn.Module):
    """Middle of the UNet: ResNet, attention, ResNet at the lowest resolution (eps 1e-5)."""

    def __init__(self, channels, temb_dim, heads, layers, context_dim):
        super().__init__()
        self.attentions = nn.ModuleList(
            [TransformerSpatioTemporal(channels, heads, layers[0], context_dim)])
        self.resnets = nn.ModuleList(
            [SpatioTemporalResBlock(channels, channels, temb_dim, 1e-5) for _ in range(2)])
        self.gradient_checkpointing = False

    def forward(self, x, emb, context, num_frames):
        ckpt = self.gradient_checkpointing
        x = run(self.resnets[0], ckpt, x, emb, num_frames)
        x = run(self.attentions[0], ckpt, x, context, num_frames)
        return run(self.resnets[1], ckpt, x, emb, num_frames)


# --- the UNet ----------------------------------------------------------------------------------

class UNetSpatioTemporal(nn.Module):
    """diffusers' UNetSpatioTemporalConditionModel: the denoiser of EchoNet-Synthetic's LVDM.

    unet(sample [B, F, Cin, H, W], timestep (int, 0-dim or [B]), encoder_hidden_states [B, S, Dc],
    added_time_ids [B, n_ids]) -> prediction [B, F, Cout, H, W]. Any F and any H, W work.
    """

    class_name = "UNetSpatioTemporalConditionModel"

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        c = config
        n = len(c.block_out_channels)
        if len(c.down_block_types) != n or len(c.up_block_types) != n:
            raise ValueError(
                "down_block_types, up_block_types and block_out_channels need the same length, "
                f"got {len(c.down_block_types)}, {len(c.up_block_types)}, {n}")
        kinds = {"CrossAttnDownBlockSpatioTemporal": True, "DownBlockSpatioTemporal": False,
                 "CrossAttnUpBlockSpatioTemporal": True, "UpBlockSpatioTemporal": False}
        for name in (*c.down_block_types, *c.up_block_types):
            if name not in kinds:
                raise ValueError(f"unsupported block type {name!r}; this UNet has {sorted(kinds)}")
        heads = per_block(c.num_attention_heads, n)
        layers = per_block(c.layers_per_block, n)
        context_dims = per_block(c.cross_attention_dim, n)
        tlayers = per_block(c.transformer_layers_per_block, n)
        ch = c.block_out_channels
        D = 4 * ch[0]  # time embedding width

        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], D)
        self.add_embedding = TimestepEmbedding(c.projection_class_embeddings_input_dim, D)

        self.down_blocks = nn.ModuleList()
        self.up_blocks = nn.ModuleList()  # registered before mid_block: diffusers' key order
        for i, kind in enumerate(c.down_block_types):
            attention = None
            if kinds[kind]:
                attention = (heads[i], per_block(tlayers[i], layers[i]), context_dims[i])
            self.down_blocks.append(DownBlockSpatioTemporal(
                ch[max(i - 1, 0)], ch[i], D, layers[i], i < n - 1, attention))
        self.mid_block = UNetMidBlockSpatioTemporal(
            ch[-1], D, heads[-1], per_block(tlayers[-1], 1), context_dims[-1])
        rch, rheads, rlayers = ch[::-1], heads[::-1], layers[::-1]
        rcontext, rtlayers = context_dims[::-1], tlayers[::-1]
        for i, kind in enumerate(c.up_block_types):
            attention = None
            if kinds[kind]:
                attention = (rheads[i], per_block(rtlayers[i], rlayers[i] + 1), rcontext[i])
            self.up_blocks.append(UpBlockSpatioTemporal(
                rch[min(i + 1, n - 1)], rch[max(i - 1, 0)], rch[i], D, rlayers[i] + 1, i < n - 1,
                attention))
        self.conv_norm_out = nn.GroupNorm(32, ch[0], eps=1e-5)
        self.conv_out = nn.Conv2d(ch[0], c.out_channels, 3, padding=1)

    def save_pretrained(self, path: str):
        """Write a diffusers-format model folder (see `save_pretrained` below)."""
        save_pretrained(self, path)

    def set_gradient_checkpointing(self, enabled: bool = True):
        """Recompute each ResNet and attention module in the backward pass to save memory."""
        for block in [*self.down_blocks, self.mid_block, *self.up_blocks]:
            block.gradient_checkpointing = enabled

    def unused_with_one_token(self):
        """Parameters that get no gradient when encoder_hidden_states has one token (EchoNet).

        The trainer freezes them so DDP needs no unused-parameter search; they stay in the
        checkpoint so the weights still load key for key.
        """
        return [p for m in self.modules() if isinstance(m, TransformerSpatioTemporal)
                for p in m.unused_with_one_token()]

    def forward(self, sample, timestep, encoder_hidden_states, added_time_ids):
        B, Fr, _, H, W = sample.shape
        # Timesteps: a python int/float, a 0-dim tensor or one per video, broadcast to [B].
        if not torch.is_tensor(timestep):
            dtype = torch.float64 if isinstance(timestep, float) else torch.int64
            timestep = torch.tensor([timestep], dtype=dtype, device=sample.device)
        elif timestep.ndim == 0:
            timestep = timestep[None].to(sample.device)
        timestep = timestep.expand(B)

        # Time embedding plus the embedding of the added time ids. EchoNet passes one id with a
        # 1-wide sinusoid, which is all zeros: the ids have no effect, only add_embedding's biases.
        emb = self.time_embedding(timestep_embedding(timestep, self.config.block_out_channels[0])
                                  .to(sample.dtype))                                 # (B, D)
        ids = timestep_embedding(added_time_ids.flatten(), self.config.addition_time_embed_dim)
        emb = emb + self.add_embedding(ids.reshape(B, -1).to(emb.dtype))            # (B, D)

        # Fold frames into the batch: every 2D layer treats the N = B*F frames independently.
        x = self.conv_in(sample.flatten(0, 1))                                       # (N, C, H, W)
        emb = emb.repeat_interleave(Fr, dim=0)                                       # (N, D)
        context = encoder_hidden_states.repeat_interleave(Fr, dim=0)                 # (N, S, Dc)

        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, emb, context, Fr)
            skips += block_skips
        x = self.mid_block(x, emb, context, Fr)
        # Sizes not divisible by 2^(number of upsamplers) (14x14 latents: 14 -> 7 -> 4 -> 2) are
        # upsampled to the size of the next skip (2 -> 4 -> 7 -> 14) instead of by 2.
        force_size = any(s % 2 ** (len(self.up_blocks) - 1) for s in (H, W))
        for block in self.up_blocks:
            block_skips, skips = skips[-len(block.resnets):], skips[:-len(block.resnets)]
            size = skips[-1].shape[2:] if force_size and block.upsamplers is not None else None
            x = block(x, block_skips, emb, context, Fr, size)
        x = self.conv_out(F.silu(self.conv_norm_out(x)))                   # (N, Cout, H, W)
        return x.reshape(B, Fr, *x.shape[1:])                              # (B, F, Cout, H, W)


# --- the autoencoder ---------------------------------------------------------------------------

def randn(shape, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Standard normal noise drawn as diffusers' randn_tensor draws it.

    A list of generators draws each batch item with its own generator; CPU generators draw on the
    CPU and the result is moved to `device`, so a seed gives the same noise on any device.
    """
    device = torch.device(device or "cpu")
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    gens = generator if isinstance(generator, list) else [generator]
    rand_device = "cpu" if gens[0] is not None and gens[0].device.type == "cpu" else device
    if isinstance(generator, list):
        items = [torch.randn((1, *shape[1:]), generator=g, device=rand_device, dtype=dtype)
                 for g in generator]
        return torch.cat(items).to(device)
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)


class DiagonalGaussian:
    """The encoder's posterior q(z | x) = N(mean, std^2) (Kingma & Welling 2014)."""

    def __init__(self, moments: torch.Tensor):  # moments: (B, 2 * latent, h, w)
        self.moments = moments
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator=None) -> torch.Tensor:
        """mean + std * eps, eps ~ N(0, I) from `generator` (one, one per item, or None)."""
        eps = randn(self.mean.shape, generator, self.moments.device, self.moments.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per item, summed over latent elements: [B]."""
        return 0.5 * torch.sum(self.mean**2 + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


class VAEAttention(nn.Module):
    """Single-head self-attention over the h*w positions, with GroupNorm and a residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x):  # x: (B, C, h, w)
        B, C, h, w = x.shape
        t = self.group_norm(x).view(B, C, h * w).transpose(1, 2)         # (B, h*w, C)
        q, k, v = self.to_q(t)[:, None], self.to_k(t)[:, None], self.to_v(t)[:, None]
        out = F.scaled_dot_product_attention(q, k, v)[:, 0]              # (B, h*w, C), scale C^-0.5
        out = self.to_out[0](out.to(q.dtype))
        return out.transpose(1, 2).reshape(B, C, h, w) + x


class VAEMidBlock(nn.Module):
    """ResNet, optional self-attention, ResNet at the VAE's lowest resolution."""

    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.attentions = nn.ModuleList([VAEAttention(channels, groups)]) if attention else None
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(channels, channels, None, 1e-6, groups) for _ in range(2)])

    def forward(self, x):
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class VAEBlock(nn.Module):
    """Encoder (DownEncoderBlock2D) or decoder (UpDecoderBlock2D) block: ResNets + resampling."""

    def __init__(self, cin, cout, num_layers, groups, down=False, up=False):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(cin if i == 0 else cout, cout, None, 1e-6, groups)
             for i in range(num_layers)])
        self.downsamplers = nn.ModuleList([Downsample2D(cout, padding=0)]) if down else None
        self.upsamplers = nn.ModuleList([Upsample2D(cout)]) if up else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    """Image [B, 3, H, W] -> moments [B, 2 * latent, H / 2^k, W / 2^k] (mean and log-variance)."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        ch, g, n = c.block_out_channels, c.norm_num_groups, len(c.block_out_channels)
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [VAEBlock(ch[max(i - 1, 0)], ch[i], c.layers_per_block, g, down=i < n - 1)
             for i in range(n)])
        self.mid_block = VAEMidBlock(ch[-1], g, c.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latent [B, latent, h, w] -> image [B, 3, h * 2^k, w * 2^k]."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        rch, g, n = c.block_out_channels[::-1], c.norm_num_groups, len(c.block_out_channels)
        self.conv_in = nn.Conv2d(c.latent_channels, rch[0], 3, padding=1)
        self.up_blocks = nn.ModuleList(  # registered before mid_block: diffusers' key order
            [VAEBlock(rch[max(i - 1, 0)], rch[i], c.layers_per_block + 1, g, up=i < n - 1)
             for i in range(n)])
        self.mid_block = VAEMidBlock(rch[0], g, c.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, rch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(rch[-1], c.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """diffusers' AutoencoderKL: encode(x) -> DiagonalGaussian posterior, decode(z) -> image.

    Images are in [-1, 1]. The UNet works on z * config.scaling_factor; divide before decoding.
    """

    class_name = "AutoencoderKL"

    def __init__(self, config: VAEConfig):
        super().__init__()
        c = self.config = config
        for name in c.down_block_types:
            if name != "DownEncoderBlock2D":
                raise ValueError(f"unsupported VAE down block {name!r}; use DownEncoderBlock2D")
        for name in c.up_block_types:
            if name != "UpDecoderBlock2D":
                raise ValueError(f"unsupported VAE up block {name!r}; use UpDecoderBlock2D")
        if c.act_fn != "silu":
            raise ValueError(f"unsupported VAE act_fn {c.act_fn!r}; only 'silu' is implemented")
        if len(c.down_block_types) != len(c.block_out_channels):
            raise ValueError("the VAE needs one down block type per block_out_channels entry")
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        k = 2 * c.latent_channels
        self.quant_conv = nn.Conv2d(k, k, 1) if c.use_quant_conv else None
        self.post_quant_conv = (nn.Conv2d(c.latent_channels, c.latent_channels, 1)
                                if c.use_post_quant_conv else None)

    def save_pretrained(self, path: str):
        """Write a diffusers-format model folder (see `save_pretrained` below)."""
        save_pretrained(self, path)

    def encode(self, x) -> DiagonalGaussian:
        """x [B, 3, H, W] in [-1, 1] -> posterior over z [B, latent, H / 8, W / 8] (4 blocks)."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def decode(self, z) -> torch.Tensor:
        """z [B, latent, h, w] (already divided by scaling_factor) -> image [B, 3, H, W]."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x, sample_posterior: bool = False, generator=None):
        """Reconstruction: decode(mode) or decode(sample) of encode(x), and the posterior."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


# --- model folders (diffusers format) ----------------------------------------------------------

CLASSES = {cls.class_name: (cls, cfg) for cls, cfg in
           [(UNetSpatioTemporal, UNetConfig), (AutoencoderKL, VAEConfig)]}
# Old diffusers names of the VAE mid-block attention, renamed on load as diffusers does.
LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def config_from_dict(config_cls, d: dict):
    """A config dataclass from a config.json dict: unknown keys ignored, missing ones default."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
    return config_cls(**kw)


def config_to_dict(model: nn.Module) -> dict:
    """The config.json diffusers writes: every field, lists for tuples, plus the class name."""
    d = {k: list(v) if isinstance(v, tuple) else v
         for k, v in dataclasses.asdict(model.config).items()}
    return {"_class_name": model.class_name, "_diffusers_version": DIFFUSERS_VERSION, **d}


def save_pretrained(model: nn.Module, path: str):
    """Write path/config.json + path/diffusion_pytorch_model.safetensors (diffusers loads it)."""
    os.makedirs(path, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tmp = os.path.join(path, f".{WEIGHTS_NAME}.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(path, WEIGHTS_NAME))
    tmp = os.path.join(path, ".config.json.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(config_to_dict(model), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, os.path.join(path, "config.json"))


def read_weights(path: str) -> tuple[dict, str]:
    """The state dict of a model folder and the file it came from (safetensors, sharded, .bin)."""
    single = os.path.join(path, WEIGHTS_NAME)
    index = single + ".index.json"
    binary = os.path.join(path, WEIGHTS_NAME_BIN)
    if os.path.isfile(single):
        return load_file(single), single
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(os.path.join(path, shard)))
        return state, index
    if os.path.isfile(binary):  # never unpickle arbitrary objects
        return torch_load(binary), binary
    raise ModelLoadError(
        f"{path}: no weights found (expected {WEIGHTS_NAME} or {WEIGHTS_NAME_BIN})")


def load_model(path: str, expect: str | None = None) -> nn.Module:
    """Build the model a diffusers-format folder describes and load its weights, strictly.

    `expect` ("UNetSpatioTemporalConditionModel" or "AutoencoderKL") rejects a folder of the
    other class. Raises ModelLoadError naming the file and the offending keys.
    """
    config_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise ModelLoadError(f"{path}: model folder not found")
    if not os.path.isfile(config_path):
        raise ModelLoadError(f"{path}: no config.json in the model folder")
    try:
        with open(config_path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{config_path}: not valid JSON ({e})") from e
    name = d.get("_class_name")
    if name not in CLASSES:
        raise ModelLoadError(f"{config_path}: unknown _class_name {name!r}; "
                             f"expected one of {sorted(CLASSES)}")
    if expect is not None and name != expect:
        raise ModelLoadError(f"{config_path}: this folder holds a {name}, expected a {expect}")
    cls, config_cls = CLASSES[name]
    try:
        model = cls(config_from_dict(config_cls, d))
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{config_path}: invalid configuration ({e})") from e
    state, source = read_weights(path)
    state = {rename_legacy(k): v for k, v in state.items()}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(f"{k} {list(state[k].shape)} (model: {list(expected[k].shape)})"
                   for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    problems = [f"{what}: {shorten(keys)}" for what, keys in
                [("missing keys", missing), ("unexpected keys", unexpected),
                 ("wrong shapes", wrong)] if keys]
    if problems:
        raise ModelLoadError(f"{source} does not match {name} of {config_path}: "
                             + "; ".join(problems))
    model.load_state_dict(state, strict=True)
    return model.eval()


def rename_legacy(key: str) -> str:
    """mid_block.attentions.0.query.weight -> ...to_q.weight (pre-0.14 diffusers VAE names)."""
    parts = key.split(".")
    if "mid_block" in parts and len(parts) >= 2 and parts[-2] in LEGACY_ATTENTION:
        parts[-2] = LEGACY_ATTENTION[parts[-2]]
        return ".".join(parts)
    return key


def shorten(keys: list, n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f" ... and {len(keys) - n} more" if len(keys) > n else "")


# --- training checkpoints ----------------------------------------------------------------------
# train.py's <run>/checkpoint-<step>/ holds plain state dicts (model.pt; ema.pt, which is {"step",
# "max_decay", "model": the EMA's weights}; optimizer.pt, scaler.pt, trainer.pt) and two JSON files
# (model_config.json as config_to_dict writes it, training_config.json). save_checkpoint fills a
# temporary folder and renames it, and deletes old ones by renaming them first, so a folder under
# its final name is complete; train.py (resume), export.py and sample.py all find them here.

CHECKPOINT_FILES = ("model.pt", "ema.pt", "optimizer.pt", "scaler.pt", "trainer.pt",
                    "model_config.json", "training_config.json")


def torch_load(path: str, **kw):
    """torch.load(path, weights_only=True) on the CPU: tensors, numbers, strings and containers
    of them, never arbitrary objects (pickles run code). ModelLoadError names a bad file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kw)
    except Exception as e:  # a missing file, a foreign pickle, a truncated zip, random bytes
        raise ModelLoadError(f"{path}: unreadable ({str(e).splitlines()[0]})") from None


def remove_folder(path: str):
    """Deletes a folder after renaming it to .tmp-removed-<name>: a crash meanwhile never leaves
    a half-deleted folder under its real name (train.py deletes .tmp-* folders when it starts)."""
    tmp = os.path.join(os.path.dirname(path), ".tmp-removed-" + os.path.basename(path))
    os.replace(path, tmp)
    shutil.rmtree(tmp)


def save_checkpoint(run: str, step: int, files: dict, keep: int):
    """Writes <run>/checkpoint-<step>/ from files {"model": state dict, ..., "model_config": dict,
    ...}: a name ending in _config as .json, others as .pt; then deletes all but the newest `keep`.
    Filled under .tmp-checkpoint-<step> and renamed at the end: a checkpoint-<step> is complete."""
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
    """[(step, path)] of a run folder's complete checkpoint-<step>/ folders, by step (newest
    last), not by modification time, which a copy scrambles; a folder lacking any of
    CHECKPOINT_FILES (an older version's half-deleted one) is left out."""
    names = os.listdir(run) if os.path.isdir(run) else []
    found = [(int(n[11:]), os.path.join(run, n)) for n in names
             if n.startswith("checkpoint-") and n[11:].isdigit()]
    return sorted((step, path) for step, path in found
                  if all(os.path.isfile(os.path.join(path, f)) for f in CHECKPOINT_FILES))


def load_checkpoint(path: str, weights: str = "ema") -> tuple[nn.Module, str]:
    """(module in eval mode, checkpoint folder): the UNet or VAE of a training checkpoint with
    its EMA weights (weights="ema", as the original exported) or its raw ones ("model"). `path`
    is a checkpoint-<step>/ folder, or a run folder: then its highest complete step."""
    if not any(os.path.isfile(os.path.join(path, f)) for f in CHECKPOINT_FILES):  # a run folder
        found = list_checkpoints(path)
        if not found:
            raise ModelLoadError(f"{path}: no complete checkpoint-<step>/ folder in it (train "
                                 "first, or name a training run folder or one of its checkpoints)")
        path = found[-1][1]
    missing = [f for f in CHECKPOINT_FILES if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise ModelLoadError(f"{path}: an incomplete checkpoint (no {', '.join(missing)})")
    file = os.path.join(path, f"{weights}.pt")
    state = torch_load(file)
    try:
        with open(os.path.join(path, "model_config.json")) as f:
            config = json.load(f)
        cls, config_cls = CLASSES[config["_class_name"]]
        module = cls(config_from_dict(config_cls, config))
        module.load_state_dict(state.get("model", state))  # ema.pt keeps them under "model"
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise ModelLoadError(f"{file}: does not load as the model of {path}/model_config.json "
                             f"({str(e).splitlines()[0]})") from None
    return module.eval(), path


# --- presets -----------------------------------------------------------------------------------
# "lvdm": EchoNet-Synthetic's echosyn/lvdm/configs/default.yaml (143,830,186 parameters).
# "echonet": the published VAE (62,412,007 parameters, 112x112 -> 4x14x14).
# The small presets train on a CPU for the demo and the tests.

UNET_PRESETS = {
    "lvdm": UNetConfig(
        sample_size=14, in_channels=8, out_channels=4, block_out_channels=(128, 256, 256, 512),
        num_attention_heads=(8, 16, 16, 32), layers_per_block=2, cross_attention_dim=1,
        addition_time_embed_dim=1, projection_class_embeddings_input_dim=1, num_frames=64),
    "small": UNetConfig(
        sample_size=14, block_out_channels=(64, 128, 128), num_attention_heads=(4, 8, 8),
        down_block_types=("CrossAttnDownBlockSpatioTemporal",) * 2 + ("DownBlockSpatioTemporal",),
        up_block_types=("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * 2,
        layers_per_block=1, cross_attention_dim=1, addition_time_embed_dim=1,
        projection_class_embeddings_input_dim=1, num_frames=32),
    "phantom": UNetConfig(  # the CPU demo's: 2 resolutions, about 1.3 M parameters
        sample_size=14, block_out_channels=(32, 64), num_attention_heads=(2, 4),
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal"),
        up_block_types=("CrossAttnUpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        layers_per_block=1, cross_attention_dim=1, addition_time_embed_dim=1,
        projection_class_embeddings_input_dim=1, num_frames=24),
    "tiny": UNetConfig(
        sample_size=14, block_out_channels=(32, 64), num_attention_heads=(2, 4),
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        layers_per_block=1, cross_attention_dim=1, addition_time_embed_dim=1,
        projection_class_embeddings_input_dim=1, num_frames=8),
}
VAE_PRESETS = {
    "echonet": VAEConfig(
        block_out_channels=(128, 256, 256, 512), layers_per_block=2, sample_size=112,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
    "small": VAEConfig(
        block_out_channels=(32, 64, 64, 64), layers_per_block=1, sample_size=112,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
    "phantom": VAEConfig(  # the CPU demo's: 8 groups so 16 channels fit, no mid attention
        block_out_channels=(16, 32, 32, 64), layers_per_block=1, sample_size=112,
        norm_num_groups=8, mid_block_add_attention=False,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
    "tiny": VAEConfig(
        block_out_channels=(32, 32, 32, 32), layers_per_block=1, sample_size=112,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Smoke run: build a preset, one forward pass.")
    parser.add_argument("--preset", default="tiny", choices=sorted(UNET_PRESETS),
                        help="UNet preset (the VAE preset is 'echonet' for lvdm, else the same)")
    parser.add_argument("--frames", type=int, default=8, help="frames in the random clip")
    args = parser.parse_args()
    torch.manual_seed(0)
    unet = UNetSpatioTemporal(UNET_PRESETS[args.preset]).eval()
    vae = AutoencoderKL(VAE_PRESETS["echonet" if args.preset == "lvdm" else args.preset]).eval()
    with torch.no_grad():
        x = torch.randn(1, args.frames, 8, 14, 14)                 # noisy latents + cond frame
        ef = torch.full((1, 1, 1), 0.55)                            # EF 55 % as EF / 100
        v = unet(x, 500, ef, torch.zeros(1, 1))
        z = vae.encode(torch.rand(2, 3, 112, 112) * 2 - 1).sample()
        img = vae.decode(z)
    print(f"UNet {args.preset}: {count_parameters(unet):,} parameters, "
          f"{list(x.shape)} -> {list(v.shape)}")
    print(f"VAE: {count_parameters(vae):,} parameters, [2, 3, 112, 112] -> {list(z.shape)} "
          f"-> {list(img.shape)}")
