"""A full Transformer FFN block: fc1 → GELU → fc2 with LoRA on both linears (issue 7).

Widths of ViT-S (384/1536), the paper's face ViT (512/2048) and ViT-B (768/3072); M tokens =
batch × 197 (a 224-pixel image in 16-pixel patches plus the class token); r = 8,
lora_alpha = 1. Providers as in :mod:`benchmarks.bench_lora_linear`: ``gslora``, ``reference``
(backend ``torch``), ``peft``, ``peft+compile`` and ``plain`` (the frozen block without LoRA,
the floor). The block's input requires grad (a block inside a network). Ratios are against
``plain``.

    python -m benchmarks.bench_ffn [--quick] [--device cuda]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .common import (
    PHASES,
    FailingProvider,
    gslora_backend_name,
    lora_factors,
    to_gslora,
    to_peft,
    training_phase_cases,
)
from .harness import BenchRun, base_parser, require_float_dtype, select_providers

BENCH = "ffn"
PROVIDERS = ("gslora", "reference", "peft", "peft+compile", "plain")
WIDTHS = {"vit_s": (384, 1536), "face_vit": (512, 2048), "vit_b": (768, 3072)}
# The face ViT's width (512/2048) lies between these two; --widths face_vit adds it.
FULL = {"widths": ["vit_s", "vit_b"], "m": [8 * 197], "r": [8]}
QUICK = {"widths": ["vit_s"], "m": [2 * 197], "r": [8]}


class Mlp(nn.Module):
    """timm's ViT MLP: fc1 → GELU → fc2 (same attribute names, so the same LoRA targets)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def build_providers(names: Sequence[str], dim: int, hidden: int, r: int, device: torch.device,
                    dtype: torch.dtype) -> tuple[dict[str, nn.Module], dict[str, dict[str, Any]]]:
    gen = torch.Generator().manual_seed(0)
    base = Mlp(dim, hidden).to(device, dtype).requires_grad_(False)
    factors = {"fc1": lora_factors(dim, hidden, r, device=device, dtype=dtype, generator=gen),
               "fc2": lora_factors(hidden, dim, r, device=device, dtype=dtype, generator=gen)}
    targets = ["fc1", "fc2"]
    builders = {
        "gslora": lambda: to_gslora(base, targets, r, 1.0, factors),
        "reference": lambda: to_gslora(base, targets, r, 1.0, factors, backend="torch"),
        "peft": lambda: to_peft(base, targets, r, 1.0, factors),
        "peft+compile": lambda: torch.compile(to_peft(base, targets, r, 1.0, factors)),
        "plain": lambda: base,
    }
    mods: dict[str, nn.Module] = {}
    for name in names:
        try:
            mods[name] = builders[name]()
        except Exception as exc:  # reported as a failed provider by the harness
            mods[name] = FailingProvider(exc)
    info = {"gslora": {"backend": gslora_backend_name(device)}, "reference": {"backend": "torch"}}
    return mods, info



def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--widths", default=None, help=f"comma-separated subset of {list(WIDTHS)}")
    p.add_argument("--m", default=None, help="tokens per call, e.g. 1576")
    p.add_argument("--r", default=None, help="LoRA ranks, e.g. 8,16")
    p.add_argument("--dtype", default="fp32", help="fp32 (default), bf16, fp16")
    args = p.parse_args(argv)
    grid = QUICK if args.quick else FULL
    widths = args.widths.split(",") if args.widths else grid["widths"]
    bad = [w for w in widths if w not in WIDTHS]
    if bad:
        raise SystemExit(f"--widths: unknown {bad}; known: {', '.join(WIDTHS)}")
    try:
        ms = [int(v) for v in args.m.split(",")] if args.m else grid["m"]
        ranks = [int(v) for v in args.r.split(",")] if args.r else grid["r"]
    except ValueError:
        raise SystemExit("--m and --r expect comma-separated integers") from None
    names = select_providers(args.providers, PROVIDERS)
    dtype = require_float_dtype(args.dtype)
    run = BenchRun(BENCH, args, dtype=dtype, argv=argv)
    dev = run.device

    for width in widths:
        dim, hidden = WIDTHS[width]
        for r in ranks:
            mods, info = build_providers(names, dim, hidden, r, dev, dtype)
            for M in ms:
                gen = torch.Generator().manual_seed(M)
                x = torch.randn(M, dim, generator=gen).to(dev, dtype).requires_grad_(True)
                g = torch.randn(M, dim, generator=gen).to(dev, dtype)
                phases = training_phase_cases(mods, x, g)
                label = f"{width} M={M} r={r}"
                params = {"width": width, "dim": dim, "hidden": hidden, "M": M, "r": r,
                          "size": M * dim * hidden}
                for phase in PHASES:
                    res = run.compare(phases[phase])
                    run.add(label, params, phase, res, baseline="plain" if "plain" in names else None,
                            provider_info=info)
    return run.finish(plot_x="size")


if __name__ == "__main__":
    main(sys.argv[1:])
