"""Models torch.fx cannot trace, written in the styles of the libraries they come from.

- `WindowViT`: a Swin-style block with shape control flow (``if H == ws``) and LeViT-style
  token-wise ``LinearBN`` MLPs (``bn(linear(x).flatten(0, 1)).reshape_as(...)``).
- `TabNetLike`: pytorch-tabnet's encoder: ghost BatchNorm over batch chunks (``np.ceil`` on
  the batch size), GLU layers whose Linears are shared between decision steps, attentive
  transformers, returns ``(logits, mask_loss)``. With ``n_steps=3`` it has 11 foldable pairs:
  2 step-specific GLU layers in each of the 4 feature transformers, and one per attentive
  transformer; the shared Linears run 4 times each and must not fold.
- `DiceDNN`: DeepCTR's DNN with the Dice activation (``assert x.dim() == self.dim``); with
  ``use_bn`` each hidden Linear -> BatchNorm1d folds, Dice's own BN never does (it reads the
  previous BN's output, or the Linear's output that Dice also multiplies).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import nn


def randomize_bn_(model: nn.Module, seed: int = 1) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


# ------------------------------------------------------------------ windowed attention


class LinearBN(nn.Module):
    def __init__(self, i: int, o: int) -> None:
        super().__init__()
        self.linear = nn.Linear(i, o, bias=False)
        self.bn = nn.BatchNorm1d(o)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class WindowBlock(nn.Module):
    def __init__(self, dim: int = 8, window_size: int = 2, heads: int = 2) -> None:
        super().__init__()
        self.ws, self.heads = window_size, heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(LinearBN(dim, 2 * dim), nn.GELU(), LinearBN(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        ws = self.ws
        if h == ws:  # one window: no partition (shape control flow)
            windows = x.reshape(b, h * w, c)
        else:
            windows = x.reshape(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
            windows = windows.reshape(-1, ws * ws, c)
        n = windows.shape[1]
        q, k, v = self.qkv(windows).reshape(-1, n, 3, self.heads, c // self.heads).permute(
            2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1)
        out = self.proj((attn @ v).transpose(1, 2).reshape(-1, n, c))
        if h != ws:
            out = out.reshape(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
        x = x + out.reshape(b, h, w, c)
        return x + self.mlp(x.reshape(b, h * w, c)).reshape(b, h, w, c)


class WindowViT(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.blocks = nn.Sequential(WindowBlock(dim), WindowBlock(dim))
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).mean((1, 2)))


# ------------------------------------------------------------------ TabNet


class GBN(nn.Module):
    """Ghost BatchNorm, as pytorch-tabnet writes it."""

    def __init__(self, dim: int, virtual_batch_size: int = 4, momentum: float = 0.02) -> None:
        super().__init__()
        self.virtual_batch_size = virtual_batch_size
        self.bn = nn.BatchNorm1d(dim, momentum=momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunks = x.chunk(int(np.ceil(x.shape[0] / self.virtual_batch_size)), 0)
        res = [self.bn(x_) for x_ in chunks]
        return torch.cat(res, dim=0)


class GLULayer(nn.Module):
    def __init__(self, i: int, o: int, fc: nn.Linear | None = None) -> None:
        super().__init__()
        self.output_dim = o
        self.fc = fc if fc is not None else nn.Linear(i, 2 * o, bias=False)
        self.bn = GBN(2 * o)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.fc(x))
        return torch.mul(x[:, : self.output_dim], torch.sigmoid(x[:, self.output_dim :]))


class GLUBlock(nn.Module):
    def __init__(self, i: int, o: int, n_glu: int, first: bool,
                 shared: nn.ModuleList | None) -> None:
        super().__init__()
        self.first, self.n_glu = first, n_glu
        self.glu_layers = nn.ModuleList(
            GLULayer(i if k == 0 else o, o, shared[k] if shared else None) for k in range(n_glu))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.sqrt(torch.FloatTensor([0.5]).to(x.device))
        if self.first:
            x = self.glu_layers[0](x)
            left = range(1, self.n_glu)
        else:
            left = range(self.n_glu)
        for k in left:
            x = torch.add(x, self.glu_layers[k](x))
            x = x * scale
        return x


class FeatTransformer(nn.Module):
    def __init__(self, i: int, o: int, shared: nn.ModuleList) -> None:
        super().__init__()
        self.shared = GLUBlock(i, o, len(shared), True, shared)
        self.specifics = GLUBlock(o, o, 2, False, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.specifics(self.shared(x))


class AttentiveTransformer(nn.Module):
    def __init__(self, i: int, group_dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(i, group_dim, bias=False)
        self.bn = GBN(group_dim)

    def forward(self, priors: torch.Tensor, processed: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.fc(processed))
        return torch.softmax(torch.mul(x, priors), dim=-1)  # (sparsemax in the library)


class TabNetLike(nn.Module):
    def __init__(self, input_dim: int = 10, n_d: int = 8, n_a: int = 8, n_steps: int = 3,
                 gamma: float = 1.3, output_dim: int = 3) -> None:
        super().__init__()
        self.n_d, self.n_steps, self.gamma = n_d, n_steps, gamma
        self.initial_bn = nn.BatchNorm1d(input_dim, momentum=0.01)
        shared = nn.ModuleList([nn.Linear(input_dim, 2 * (n_d + n_a), bias=False),
                                nn.Linear(n_d + n_a, 2 * (n_d + n_a), bias=False)])
        self.initial_splitter = FeatTransformer(input_dim, n_d + n_a, shared)
        self.feat_transformers = nn.ModuleList(
            FeatTransformer(input_dim, n_d + n_a, shared) for _ in range(n_steps))
        self.att_transformers = nn.ModuleList(
            AttentiveTransformer(n_a, input_dim) for _ in range(n_steps))
        self.final_mapping = nn.Linear(n_d, output_dim, bias=False)
        self.register_buffer("group_attention_matrix", torch.eye(input_dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.initial_bn(x)
        prior = torch.ones(x.shape, device=x.device)
        att = self.initial_splitter(x)[:, self.n_d :]
        res = torch.zeros(x.shape[0], self.n_d, device=x.device)
        m_loss = torch.zeros((), device=x.device)
        for step in range(self.n_steps):
            m = self.att_transformers[step](prior, att)
            m_loss = m_loss + torch.mean(torch.sum(m * torch.log(m + 1e-15), dim=1))
            prior = torch.mul(self.gamma - m, prior)
            masked_x = torch.mul(torch.matmul(m, self.group_attention_matrix), x)
            out = self.feat_transformers[step](masked_x)
            res = torch.add(res, torch.relu(out[:, : self.n_d]))
            att = out[:, self.n_d :]
        return self.final_mapping(res), m_loss / self.n_steps


# ------------------------------------------------------------------ DeepCTR DNN + Dice


class Dice(nn.Module):
    def __init__(self, emb_size: int, dim: int = 2, epsilon: float = 1e-8) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(emb_size, eps=epsilon)
        self.sigmoid = nn.Sigmoid()
        self.dim = dim
        self.alpha = nn.Parameter(torch.full((emb_size,), 0.25))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dim() == self.dim
        x_p = self.sigmoid(self.bn(x))
        return self.alpha * (1 - x_p) * x + x_p * x


class DiceDNN(nn.Module):
    def __init__(self, inputs_dim: int = 10, hidden_units: tuple[int, ...] = (16, 12, 8),
                 use_bn: bool = True) -> None:
        super().__init__()
        dims = [inputs_dim, *hidden_units]
        self.use_bn = use_bn
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))
        if use_bn:
            self.bn = nn.ModuleList(nn.BatchNorm1d(b) for b in dims[1:])
        self.activation_layers = nn.ModuleList(Dice(b) for b in dims[1:])
        self.dropout = nn.Dropout(0.1)
        self.out = nn.Linear(dims[-1], 1)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        deep_input = inputs
        for i in range(len(self.linears)):
            fc = self.linears[i](deep_input)
            if self.use_bn:
                fc = self.bn[i](fc)
            fc = self.activation_layers[i](fc)
            deep_input = self.dropout(fc)
        return torch.sigmoid(self.out(deep_input))
