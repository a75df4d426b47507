"""A LeViT-shaped model (timm's `LinearNorm` / `Attention` / `NormLinear` patterns) for the tests.

`LinearNorm` is `bn(linear(x).flatten(0, 1)).reshape_as(linear(x))`: the Linear's output also
feeds `reshape_as`, but only for its shape, so the pair must still fold. The attention caches
its bias table per device string, which torch.fx must trace through.
"""

from __future__ import annotations

import torch
from torch import nn


class LinearNorm(nn.Module):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.bn = nn.BatchNorm1d(out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class Attention(nn.Module):
    def __init__(self, dim: int = 16, key_dim: int = 4, heads: int = 2, resolution: int = 4) -> None:
        super().__init__()
        self.heads, self.key_dim, self.val_dim = heads, key_dim, 2 * key_dim
        self.scale = key_dim**-0.5
        self.qkv = LinearNorm(dim, heads * (2 * key_dim + self.val_dim))
        self.proj = nn.Sequential(nn.Hardswish(), LinearNorm(heads * self.val_dim, dim))
        self.attention_biases = nn.Parameter(torch.linspace(-1, 1, heads * resolution**2)
                                             .reshape(heads, resolution**2))
        pos = torch.stack(torch.meshgrid(torch.arange(resolution), torch.arange(resolution),
                                         indexing="ij")).flatten(1)
        rel = (pos[..., :, None] - pos[..., None, :]).abs()
        self.register_buffer("attention_bias_idxs", rel[0] * resolution + rel[1], persistent=False)
        self.attention_bias_cache: dict[str, torch.Tensor] = {}

    def get_attention_biases(self, device: torch.device) -> torch.Tensor:
        if torch.jit.is_tracing() or self.training:
            return self.attention_biases[:, self.attention_bias_idxs]
        key = str(device)
        if key not in self.attention_bias_cache:
            self.attention_bias_cache[key] = self.attention_biases[:, self.attention_bias_idxs]
        return self.attention_bias_cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, self.heads, -1).split(
            [self.key_dim, self.key_dim, self.val_dim], dim=3)
        attn = q.permute(0, 2, 1, 3) @ k.permute(0, 2, 3, 1) * self.scale
        attn = (attn + self.get_attention_biases(x.device)).softmax(dim=-1)
        x = (attn @ v.permute(0, 2, 1, 3)).transpose(1, 2).reshape(b, n, -1)
        return self.proj(x)


class NormLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(in_features)
        self.drop = nn.Dropout(0.2)  # the identity in eval mode, as in timm's NormLinear
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.drop(self.bn(x)))


class LeViTLike(nn.Module):
    def __init__(self, depth: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({
                "attn": Attention(),
                "mlp": nn.Sequential(LinearNorm(16, 32), nn.Hardswish(), LinearNorm(32, 16)),
            })
            for _ in range(depth)
        )
        self.head = NormLinear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block["attn"](x)
            x = x + block["mlp"](x)
        return self.head(x.mean(1))

    @staticmethod
    def example_inputs() -> tuple[torch.Tensor]:
        return (torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(0)),)
