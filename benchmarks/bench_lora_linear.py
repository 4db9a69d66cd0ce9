"""LoRA linear: forward, backward and both, side by side (issue 2).

Shapes of ViT-S/B FFN linears (K, N = 384/1536 and 768/3072), M = 256 and 4096 rows (tokens),
r = 8 and 16, s = lora_alpha / r with lora_alpha = 1 (the authors' setting). Providers:

* ``gslora``        ``GSLoRALinear``, default backend (the compiled ``cpu`` one when gslora._C is built)
* ``reference``     ``GSLoRALinear(backend="torch")``: the plain-PyTorch specification
* ``peft``          PEFT LoRA on ``nn.Linear``, eager
* ``peft+compile``  the same under ``torch.compile`` (compile time is in ``first_call_s``)
* ``plain``         a frozen ``nn.Linear`` (the floor: what the layer costs without any adapter)

The input requires grad (a layer inside a network computes dx), so even the frozen plain
Linear has a backward: dx = g W. Ratios are against ``plain``. ``--dropout p`` gives every
adapter a LoRA dropout (training mode; the mask is drawn on every call, as in training).

    python -m benchmarks.bench_lora_linear [--quick] [--device cuda] [--dropout 0.1] [--plot lora.png]
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

BENCH = "lora_linear"
PROVIDERS = ("gslora", "reference", "peft", "peft+compile", "plain")
FULL = {"kn": [(384, 1536), (768, 3072)], "m": [256, 4096], "r": [8, 16]}
QUICK = {"kn": [(384, 1536)], "m": [256], "r": [8]}


class _Wrap(nn.Module):
    """A one-layer model, so PEFT's ``target_modules=["fc"]`` finds the linear."""

    def __init__(self, fc: nn.Linear) -> None:
        super().__init__()
        self.fc = fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def _pairs(text: str) -> list[tuple[int, int]]:
    try:
        return [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",")]  # type: ignore[misc]
    except ValueError:
        raise SystemExit(f"--kn expects e.g. 384x1536,768x3072, got {text!r}") from None


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise SystemExit(f"{flag} expects comma-separated integers, got {text!r}") from None


def build_providers(names: Sequence[str], K: int, N: int, r: int, device: torch.device,
                    dtype: torch.dtype, seed: int = 0, dropout: float = 0.0
                    ) -> tuple[dict[str, nn.Module], dict[str, dict[str, Any]]]:
    """The modules to compare (same frozen base, same A and B, the same LoRA dropout; in
    training mode) and per-provider info."""
    gen = torch.Generator().manual_seed(seed)
    base = _Wrap(nn.Linear(K, N)).to(device, dtype).requires_grad_(False)
    factors = {"fc": lora_factors(K, N, r, device=device, dtype=dtype, generator=gen)}
    mods: dict[str, nn.Module] = {}
    info: dict[str, dict[str, Any]] = {}
    for name in names:
        try:
            if name == "gslora":
                mods[name] = to_gslora(base, ["fc"], r, 1.0, factors, lora_dropout=dropout)
                info[name] = {"backend": gslora_backend_name(device)}
            elif name == "reference":
                mods[name] = to_gslora(base, ["fc"], r, 1.0, factors, backend="torch",
                                       lora_dropout=dropout)
                info[name] = {"backend": "torch"}
            elif name == "peft":
                mods[name] = to_peft(base, ["fc"], r, 1.0, factors, lora_dropout=dropout)
            elif name == "peft+compile":
                mods[name] = torch.compile(to_peft(base, ["fc"], r, 1.0, factors,
                                                   lora_dropout=dropout))
            elif name == "plain":
                mods[name] = base
        except Exception as exc:  # reported as a failed provider by the harness
            mods[name] = FailingProvider(exc)
    return mods, info



def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--kn", default=None, help="K x N pairs, e.g. 384x1536,768x3072")
    p.add_argument("--m", default=None, help="rows M, e.g. 256,4096")
    p.add_argument("--r", default=None, help="LoRA ranks, e.g. 8,16")
    p.add_argument("--dtype", default="fp32", help="fp32 (default), bf16, fp16")
    p.add_argument("--dropout", type=float, default=0.0,
                   help="LoRA dropout of every adapter provider (default 0, the authors' setting)")
    args = p.parse_args(argv)
    if not 0.0 <= args.dropout < 1.0:
        raise SystemExit(f"--dropout must lie in [0, 1), got {args.dropout}")
    grid = QUICK if args.quick else FULL
    kns = _pairs(args.kn) if args.kn else grid["kn"]
    ms = _ints(args.m, "--m") if args.m else grid["m"]
    ranks = _ints(args.r, "--r") if args.r else grid["r"]
    names = select_providers(args.providers, PROVIDERS)
    dtype = require_float_dtype(args.dtype)
    run = BenchRun(BENCH, args, dtype=dtype, argv=argv)
    dev = run.device

    for K, N in kns:
        for r in ranks:
            mods, info = build_providers(names, K, N, r, dev, dtype, dropout=args.dropout)
            for M in ms:
                gen = torch.Generator().manual_seed(M)
                x = torch.randn(M, K, generator=gen).to(dev, dtype).requires_grad_(True)
                g = torch.randn(M, N, generator=gen).to(dev, dtype)
                phases = training_phase_cases(mods, x, g)
                label = f"M={M} K={K} N={N} r={r}" + (f" p={args.dropout:g}" if args.dropout else "")
                params = {"M": M, "K": K, "N": N, "r": r, "size": M * K * N,
                          "dropout": args.dropout}
                for phase in PHASES:
                    res = run.compare(phases[phase])
                    run.add(label, params, phase, res, baseline="plain" if "plain" in names else None,
                            provider_info=info)
                del x, g, phases
            del mods
    return run.finish(plot_x="size", series_key="r")


if __name__ == "__main__":
    main(sys.argv[1:])
