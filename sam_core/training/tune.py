"""Parameter-efficient fine-tuning: which parts of SAM train, and the small modules
that adapt a frozen image encoder (as SAM-Adapter, Medical SAM Adapter, MedSAM and
micro-sam do).

Modes (``TUNE_MODES``):
    decoder         the mask decoder only
    decoder_prompt  the mask decoder and the prompt encoder
    adapter         bottleneck adapters after every attention of the image encoder
                    (Medical SAM Adapter's placement), plus the mask decoder
    lora            low-rank updates of every attention's qkv and output projections
                    (LoRA, Hu et al. 2021), plus the mask decoder
    full            everything (the SAM paper's recipe)

The frozen parts never change, so a tuned model is its base plus ``tuned_state``: the
trainable tensors only (``TunedSpec`` says how to rebuild it). ``apply_tuned`` puts them
on a base model; for ``lora`` it then merges the low-rank updates into the projections,
which gives a plain SAM again (same modules, same state-dict keys as the official
model); an adapter model keeps its adapter modules.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, List

import torch
from torch import nn

TUNE_MODES = ("decoder", "decoder_prompt", "adapter", "lora", "full")
ENCODER_MODES = ("adapter", "lora")  # modes that change what the image encoder computes


@dataclass(frozen=True)
class TunedSpec:
    """How a tuned model is rebuilt from its base: the mode and the adapter sizes."""

    mode: str
    lora_rank: int = 4
    lora_alpha: float = 8.0
    adapter_ratio: float = 0.25  # adapter bottleneck width / embedding width

    def __post_init__(self) -> None:
        if self.mode not in TUNE_MODES:
            raise ValueError(f"unknown tune mode {self.mode!r}; known: {', '.join(TUNE_MODES)}")

    def to_dict(self) -> dict:
        return asdict(self)


class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) * B(A(x))`` with ``base`` frozen; B starts at zero, so the
    wrapped layer starts as the base layer exactly."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    def merged(self) -> nn.Linear:
        """The base layer with the low-rank update added to its weight."""
        with torch.no_grad():
            self.base.weight += (self.lora_b @ self.lora_a) * self.scale
        return self.base


class Adapter(nn.Module):
    """A bottleneck MLP added to its input (down, GELU, up); ``up`` starts at zero, so
    the adapter starts as the identity."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))


class AdaptedAttention(nn.Module):
    """An attention module followed by an adapter on its output."""

    def __init__(self, attn: nn.Module, adapter: Adapter) -> None:
        super().__init__()
        self.attn = attn
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.attn(x))


def _attentions(sam: nn.Module) -> List[nn.Module]:
    """The attention modules of the image encoder's blocks (each has qkv and proj)."""
    return [block.attn for block in sam.image_encoder.blocks]


def _insert(sam: nn.Module, spec: TunedSpec) -> None:
    """Adds the spec's adapter or LoRA modules to ``sam``'s image encoder (in place)."""
    if spec.mode == "lora":
        for attn in _attentions(sam):
            attn.qkv = LoRALinear(attn.qkv, spec.lora_rank, spec.lora_alpha)
            attn.proj = LoRALinear(attn.proj, spec.lora_rank, spec.lora_alpha)
    elif spec.mode == "adapter":
        for block in sam.image_encoder.blocks:
            dim = block.attn.proj.out_features
            block.attn = AdaptedAttention(block.attn, Adapter(dim, max(1, int(dim * spec.adapter_ratio))))


def _trainable(name: str, mode: str) -> bool:
    if mode == "full":
        return True
    if name.startswith("mask_decoder.conv_s"):
        # SAM 2's projections of the high-resolution maps run once per image with the
        # encoder (``Sam2.encode``), whose output a frozen encoder's run caches: they
        # train with the encoder (full), not with the decoder.
        return False
    if name.startswith("mask_decoder."):
        return True
    if mode == "decoder_prompt" and name.startswith("prompt_encoder."):
        return True
    return mode in ENCODER_MODES and (".lora_" in name or ".adapter." in name)


def prepare(sam: nn.Module, spec: TunedSpec, state: Dict[str, torch.Tensor] | None = None) -> List[str]:
    """Makes ``sam`` trainable as ``spec`` says (in place): adds its adapter or LoRA
    modules, loads ``state`` (a tuned model's tensors, to go on training it) if given,
    and freezes every other parameter. Returns the trainable parameters' names."""
    _insert(sam, spec)
    if state is not None:
        load_tuned(sam, spec, state)
    names = []
    for name, param in sam.named_parameters():
        param.requires_grad_(_trainable(name, spec.mode))
        if param.requires_grad:
            names.append(name)
    return names


def encoder_frozen(spec: TunedSpec) -> bool:
    """Whether the image encoder computes the same embeddings as the base model's: then
    they can be computed once per image and cached."""
    return spec.mode not in (*ENCODER_MODES, "full")


def tuned_state(sam: nn.Module, spec: TunedSpec) -> Dict[str, torch.Tensor]:
    """The tensors a tuned model adds to its base: the trainable parameters (all of them
    for ``full``), on the CPU."""
    return {name: p.detach().cpu().clone() for name, p in sam.named_parameters() if _trainable(name, spec.mode)}


def apply_tuned(sam: nn.Module, spec: TunedSpec, state: Dict[str, torch.Tensor], merge: bool = True) -> nn.Module:
    """Puts a tuned model's tensors on its base ``sam`` (in place; returns it): inserts the
    spec's modules, checks that ``state`` holds exactly the trainable tensors of this
    architecture (a ValueError names the difference), loads them, and with ``merge``
    folds LoRA updates into the projections (a plain SAM again)."""
    _insert(sam, spec)
    load_tuned(sam, spec, state)
    if merge and spec.mode == "lora":
        for attn in _attentions(sam):
            attn.qkv = attn.qkv.merged()
            attn.proj = attn.proj.merged()
    return sam


def load_tuned(sam: nn.Module, spec: TunedSpec, state: Dict[str, torch.Tensor]) -> None:
    """Loads a tuned model's tensors into ``sam`` that has the spec's modules already
    (``prepare``); ``state`` must hold exactly its trainable tensors (ValueError)."""
    expected = {name for name, _ in sam.named_parameters() if _trainable(name, spec.mode)}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"tuned tensors do not fit this model ({spec.mode}): missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    params = dict(sam.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            if params[name].shape != value.shape:
                raise ValueError(f"tuned tensor {name}: {tuple(value.shape)} in the file, "
                                 f"{tuple(params[name].shape)} in the model")
            params[name].copy_(value)
