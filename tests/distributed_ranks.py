"""Two CPU ranks (gloo) train a small GS-LoRA ViT under DDP and under FSDP2's ``fully_shard``
and check both against the same model trained in one process (each step's zero groups, the
final parameters and group norms; adapter files saved, exported and loaded; a merge): GS-LoRA on
replicated and on DTensor-sharded parameters.

Run by tests/test_sparsity.py::test_ddp_and_fsdp2_training_match_one_process as
``python tests/distributed_ranks.py STORE_DIR``; exits non-zero on the first mismatch.
"""

from __future__ import annotations

import os
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

WORLD = 2
STEPS = 4


def base_model() -> torch.nn.Module:
    from gslora.models import ViT

    torch.manual_seed(0)
    return ViT(img_size=8, patch_size=4, embed_dim=16, depth=3, num_heads=2, mlp_dim=24,
               num_classes=5).double()


def build_model(r1: int = 1, r2: int = 3) -> torch.nn.Module:
    from gslora import GSLoRALinear

    model = base_model()
    model.requires_grad_(False)
    for i, block in enumerate(model.blocks):
        # r = 1 on fc1: lora_A [1, 16] is an empty shard on rank 1; r = 3 on fc2: uneven shards.
        block.mlp.fc1 = GSLoRALinear.from_linear(block.mlp.fc1, r=r1)
        block.mlp.fc2 = GSLoRALinear.from_linear(block.mlp.fc2, r=r2)
        with torch.no_grad():  # B = 0 at init: give every group a distinct, non-zero norm
            block.mlp.fc1.lora_B.normal_(0.0, 0.1 * (i + 1))
            block.mlp.fc2.lora_B.normal_(0.0, 0.1 * (i + 1))
    return model


def block_groups(model) -> dict[str, list[torch.Tensor]]:
    """One group per block, {fc1.A, fc1.B, fc2.A, fc2.B} (the module's current parameters)."""
    return {f"block{i}": [b.mlp.fc1.lora_A, b.mlp.fc1.lora_B, b.mlp.fc2.lora_A, b.mlp.fc2.lora_B]
            for i, b in enumerate(model.blocks)}


def train(model, sparsity, opt, x, y, beta) -> list[list[bool]]:
    """STEPS steps: the penalty in the loss (even steps) or added to .grad (odd steps), then
    AdamW and the prox in Adam's metric. Returns each step's zero groups."""
    zeros = []
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        if step % 2 == 0:
            loss = loss + beta * sparsity.penalty()
            loss.backward()
        else:
            loss.backward()
            sparsity.add_penalty_grad_(beta)
        opt.step()
        zeros.append(opt.last_result.zero.tolist())
    return zeros


def make_optimizer(sparsity, alpha):
    import gslora

    return gslora.ProxOptimizer(torch.optim.AdamW(sparsity.params, lr=1e-2), sparsity,
                                alpha=alpha, metric="adam")


def assert_params_match(model, ref, skip: str | None = None) -> None:
    """Every parameter of ``model`` (DTensors gathered) equals ``ref``'s of the same name."""
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        if skip is None or skip not in name:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            torch.testing.assert_close(full.detach(), ref_params[name].detach(), rtol=1e-9,
                                       atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


def check_rank(rank: int, store_dir: str) -> None:
    from safetensors.torch import load_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    import gslora
    from gslora.adapters import adapter_state_dict, read_adapter

    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(store_dir, "store"), WORLD),
                            rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(8, 1, 8, 8, dtype=torch.float64, generator=gen)
        y = torch.randint(0, 5, (8,), generator=gen)
        half = slice(rank * 4, rank * 4 + 4)  # each rank's half of the batch

        # The reference: one process, the whole batch (every rank runs it).
        ref = build_model()
        ref_sp = gslora.GroupSparsity(block_groups(ref))
        ref_norms0 = ref_sp.norms()
        # α: block 0 is zeroed from step 1 on, blocks 1 and 2 stay (margins >= 0.19 in norm).
        alpha, beta = 0.25, 1e-3
        ref_zeros = train(ref, ref_sp, make_optimizer(ref_sp, alpha), x, y, beta)
        assert ref_zeros[1:] == [[True, False, False]] * (STEPS - 1), ref_zeros

        # DDP: whole tensors on every rank, gradients averaged over the two halves; the step is
        # the fused AdamW + prox, and the penalty is the same on every rank.
        ddp = DistributedDataParallel(build_model())
        sp = gslora.GroupSparsity(block_groups(ddp.module))
        opt = make_optimizer(sp, alpha)
        assert train(ddp, sp, opt, x[half], y[half], beta) == ref_zeros
        assert opt.last_step_fused
        assert_params_match(ddp.module, ref)

        # FSDP2: every parameter a DTensor sharded over the two ranks.
        mesh = init_device_mesh("cpu", (WORLD,))

        def sharded(m):
            for block in m.blocks:
                fully_shard(block, mesh=mesh)
            return fully_shard(m, mesh=mesh)

        # The surgery's groups of a sharded model: add_gslora before fully_shard, from_model after.
        surgery = {}
        for name in ("whole", "sharded"):
            m = base_model()
            gslora.add_gslora(m, r=3)
            surgery[name] = gslora.GroupSparsity.from_model(sharded(m) if name == "sharded" else m)
        assert surgery["sharded"].names == surgery["whole"].names, surgery["sharded"].names
        assert surgery["sharded"].sizes == surgery["whole"].sizes
        torch.testing.assert_close(surgery["sharded"].norms(), surgery["whole"].norms(),
                                   rtol=1e-13, atol=0)

        model = sharded(build_model())
        sp = gslora.GroupSparsity(block_groups(model))
        assert all(isinstance(p, DTensor) for p in sp.params), "fully_shard made no DTensors"
        assert sp.sizes == ref_sp.sizes, (sp.sizes, ref_sp.sizes)  # global sizes
        assert "distributed" in repr(sp), repr(sp)
        empty = model.blocks[0].mlp.fc1.lora_A.to_local().numel() == 0
        assert empty == (rank == 1), "expected an empty lora_A shard on rank 1"
        torch.testing.assert_close(sp.norms(), ref_norms0, rtol=1e-13, atol=0)
        opt = make_optimizer(sp, alpha)
        assert train(model, sp, opt, x[half], y[half], beta) == ref_zeros
        assert not opt.last_step_fused  # (AdamW's own step, then the prox)
        assert_params_match(model, ref)
        torch.testing.assert_close(sp.norms(), ref_sp.norms(), rtol=1e-9, atol=1e-12)

        # Adapter files: the shards gathered on save (every rank writes the same file), each
        # rank's shards taken from the file on load into a freshly sharded model.
        path = gslora.save_adapter(model, os.path.join(store_dir, "adapter.safetensors"))
        saved, _ = read_adapter(path)
        expected = adapter_state_dict(ref)
        assert saved.keys() == expected.keys(), (sorted(saved), sorted(expected))
        for key, value in expected.items():
            torch.testing.assert_close(saved[key], value, rtol=1e-9, atol=1e-12)
        fresh = sharded(build_model())
        gslora.load_adapter(fresh, path)
        assert_params_match(fresh, ref)
        # PEFT's format takes one rank for all layers: a fresh model with r = 3 throughout.
        peft = {}
        for name, m in (("sharded", sharded(build_model(3, 3))), ("whole", build_model(3, 3))):
            out = gslora.export_peft(m, os.path.join(store_dir, f"peft-{name}{rank}"))
            peft[name] = load_file(os.path.join(out, "adapter_model.safetensors"))
        assert peft["sharded"].keys() == peft["whole"].keys()
        for key, value in peft["whole"].items():
            assert torch.equal(peft["sharded"][key], value), key

        # Merging W <- W + s·B·A into the sharded weights (DTensor ops), as in one process.
        # (The re-initialised A differ: DTensor draws its own random numbers; B = 0 again.)
        for m in (model, ref):
            gslora.merge_gslora(m)
        assert_params_match(model, ref, skip="lora_A")
        with torch.no_grad():
            torch.testing.assert_close(model(x[half]), ref(x[half]), rtol=1e-9, atol=1e-12)
    finally:
        dist.destroy_process_group()


def rank_main(rank: int, store_dir: str) -> None:
    # Leave by os._exit: Gloo's worker threads can abort the interpreter's finalization after a
    # clean destroy_process_group ("terminate called without an active exception", SIGABRT in
    # about 1 run of 15 here), which would turn a passed check into a failed run.
    code = 1
    try:
        check_rank(rank, store_dir)
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    mp.spawn(rank_main, args=(sys.argv[1],), nprocs=WORLD)
    print("distributed ranks: ok")
