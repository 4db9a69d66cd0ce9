"""Smoke tests of the benchmark suite: the harness and one tiny bench run end to end.

No timing assertions (a benchmark is not a test); these check that the tooling measures,
reports failures, writes JSON lines and renders the report.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `benchmarks` is a top-level package of the repository
    sys.path.insert(0, str(ROOT))

from benchmarks import harness, report  # noqa: E402
from benchmarks.harness import Case, compare  # noqa: E402

MIB = 2**20


def _boom(_):
    raise ValueError("provider exploded on purpose")


def test_compare_times_alternating_pair_measures_memory_and_survives_a_failure():
    x = torch.randn(64)
    calls: list[str] = []

    def alloc(_):
        calls.append("alloc")
        return torch.ones(MIB // 4)  # 1 MiB of float32, alive until the call's result is dropped

    def small(_):
        calls.append("small")
        return x + 1

    res = compare({"alloc": Case(alloc), "small": Case(small), "broken": Case(_boom)}, "cpu",
                  warmup=1, min_reps=4, max_reps=4, target_s=1e-6, min_sample_s=0.0, verbose=False)
    assert list(res) == ["alloc", "small", "broken"]
    for name in ("alloc", "small"):
        m = res[name]
        assert m.ok and m.error is None and len(m.times_s) == 4 and m.inner == 1
        assert 0 < m.p20_s <= m.median_s <= m.p80_s
        assert m.first_call_s is not None and m.first_call_s > 0
    # The timed rounds alternate: round i starts with provider i mod 2.
    timed = calls[2:10]
    assert timed == ["alloc", "small", "small", "alloc", "alloc", "small", "small", "alloc"]
    assert MIB <= res["alloc"].peak_bytes < 2 * MIB
    assert res["small"].peak_bytes < MIB // 8
    broken = res["broken"]
    assert not broken.ok and "ValueError: provider exploded on purpose" in broken.error
    assert broken.record()["median_s"] is None and broken.peak_bytes is None


def test_setup_is_not_timed_and_inner_repeats_fast_calls():
    seen = []
    res = compare({"p": Case(fn=lambda s: seen.append(s), setup=lambda: "state")}, "cpu",
                  warmup=1, min_reps=2, max_reps=2, target_s=1e-6, memory=False, verbose=False)
    assert seen and set(seen) == {"state"} and res["p"].inner == 1  # setup disables inner
    res = compare({"q": Case(fn=lambda _: None)}, "cpu", warmup=2, min_reps=2, max_reps=2,
                  target_s=1e-6, min_sample_s=1e-3, memory=False, verbose=False)
    assert res["q"].inner > 1 and res["q"].peak_bytes is None


def test_compare_rejects_bad_settings():
    with pytest.raises(ValueError, match="warmup"):
        compare({"a": Case(lambda _: None)}, "cpu", warmup=0)
    with pytest.raises(ValueError, match="min_reps"):
        compare({"a": Case(lambda _: None)}, "cpu", min_reps=5, max_reps=2)


def test_paired_ratio_cancels_a_slow_spell_that_the_ratio_of_medians_keeps():
    # Provider a costs 1.05x b; a slow spell (1.5x) starts in round 3 between b's call and a's.
    # The ratio of medians takes the spell into a's median and not b's; the paired one does not.
    b = [1.0, 1.0, 1.0, 1.0, 1.5, 1.5]
    a = [1.05, 1.05, 1.05, 1.575, 1.575, 1.575]
    assert statistics.median(a) / statistics.median(b) == pytest.approx(1.3125)
    assert harness.paired_ratio(a, b) == pytest.approx(1.05)
    assert harness.paired_ratio(a, b[:-1]) is None  # not the same rounds
    assert harness.paired_ratio([], []) is None and harness.paired_ratio(a, None) is None
    ra = {"run_id": "r", "bench": "x", "device": "cpu", "case": "c", "phase": "p",
          "median_s": statistics.median(a), "times_s": a}
    rb = {**ra, "median_s": statistics.median(b), "times_s": b}
    assert report.ratio(ra, rb) == pytest.approx(1.05)
    # Samples of different comparisons (or none, as in older records): the ratio of medians.
    assert report.ratio(ra, {**rb, "phase": "q"}) == pytest.approx(ra["median_s"] / rb["median_s"])
    assert report.ratio({k: v for k, v in ra.items() if k != "times_s"}, rb) == pytest.approx(
        ra["median_s"] / rb["median_s"])
    assert report.ratio(ra, {**rb, "median_s": None}) is None


def test_keep_freed_memory_keeps_a_freed_block_in_the_process():
    # In subprocesses: the setting lasts for the whole process that makes it. A 64 MiB tensor,
    # written and freed: by default glibc gives it back to the OS at once (mmap / munmap); once
    # keep_freed_memory is set it stays resident for the next allocation. (A first CI run
    # counted 8 MiB of other growth with the default: the bound is half the block.)
    import platform

    code = ("import os, sys; sys.path.insert(0, sys.argv[1]); import torch; "
            "from benchmarks.harness import keep_freed_memory; "
            "print(keep_freed_memory() if sys.argv[2] == 'keep' else 'default'); "
            "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE'); "
            "torch.ones(1024).sum(); "  # torch's lazy initialisation (thread pools) before the count
            "before = rss(); t = torch.ones(16 * 2**20); del t; print((rss() - before) // 2**20)")

    def run(mode: str) -> tuple[str, int]:
        lines = subprocess.run([sys.executable, "-c", code, str(ROOT), mode], capture_output=True,
                               text=True, check=True).stdout.split()
        return " ".join(lines[:-1]), int(lines[-1])

    if platform.libc_ver()[0] != "glibc":
        assert run("keep")[0] == "None"
        return
    setting, kept_mib = run("keep")
    assert setting.startswith("glibc mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=-1)")
    assert kept_mib >= 60
    # Half the block: what else the process grows by meanwhile (a few MiB) stays well below.
    assert run("default")[1] < 32


def test_compare_counts_the_page_faults_of_each_call():
    # In a subprocess, under glibc's default (another test may set keep_freed_memory in this
    # one): a 64 MiB block, above glibc's 32 MiB mmap ceiling, is mapped afresh on every call, so
    # each call faults on every page it writes; filling a block made once faults on none.
    code = ("import os, sys; sys.path.insert(0, sys.argv[1]); import torch; "
            "from benchmarks.harness import Case, compare; "
            "buf = torch.zeros(16 * 2**20); "
            "res = compare({'fresh': Case(lambda _: torch.ones(16 * 2**20)), "
            "'reuse': Case(lambda _: buf.fill_(1.0))}, 'cpu', warmup=1, min_reps=3, max_reps=3, "
            "target_s=1e-6, min_sample_s=0.0, memory=False, verbose=False); "
            "print(os.sysconf('SC_PAGE_SIZE'), len(res['fresh'].page_faults), "
            "res['fresh'].record()['page_faults_median'], res['reuse'].record()['page_faults_median'])")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True,
                         check=True).stdout.split()
    page, samples, fresh, reuse = int(out[0]), int(out[1]), float(out[2]), float(out[3])
    assert samples == 3
    # At least one fault per 2 MiB (a kernel with transparent huge pages "always" maps the block
    # in 2 MiB pages; with 4 KiB pages it is one per page).
    assert fresh >= 0.9 * 64 * MIB // max(page, 2 * MIB)
    assert reuse < fresh / 10
    assert harness.fmt_faults([]) == "-" and harness.fmt_faults([3.0, 1.0, 2.0]) == "2"


def test_run_all_passes_its_options_to_every_script(tmp_path, monkeypatch):
    from benchmarks import run_all

    commands = []

    def fake_run(cmd, **kw):
        commands.append(cmd)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(run_all.subprocess, "run", fake_run)
    out = tmp_path / "suite.jsonl"
    assert run_all.main(["--only", "lora_linear,group_sparsity", "--quick", "--threads", "1",
                         "--keep-freed-memory", "--no-report", "--out", str(out)]) == 0
    assert [c[2] for c in commands] == ["benchmarks.bench_lora_linear", "benchmarks.bench_group_sparsity"]
    for cmd in commands:
        assert "--quick" in cmd and "--keep-freed-memory" in cmd and cmd[cmd.index("--threads") + 1] == "1"
    run = json.loads(out.read_text().splitlines()[-1])
    assert run["type"] == "run" and [s["rc"] for s in run["steps"]] == [0, 0]
    commands.clear()
    run_all.main(["--only", "ffn", "--no-report", "--out", str(out)])
    assert "--keep-freed-memory" not in commands[0]


def test_format_table_aligns_columns():
    text = harness.format_table(("name", "ms"), [("a", "1.5"), ("longer", "12.25")])
    lines = text.splitlines()
    assert len(lines) == 4 and lines[1] == "------  -----"
    assert lines[2] == "a         1.5" and lines[3] == "longer  12.25"  # numbers right-aligned
    with pytest.raises(ValueError, match="cells"):
        harness.format_table(("a", "b"), [("only one",)])


def test_bench_lora_linear_tiny_run_writes_records_and_report(tmp_path, capsys):
    from benchmarks import bench_lora_linear

    out = tmp_path / "lora.jsonl"
    records = bench_lora_linear.main([
        "--quick", "--kn", "32x48", "--m", "16", "--r", "4",
        "--providers", "gslora,reference,peft,plain", "--out", str(out),
        "--warmup", "1", "--min-reps", "2", "--max-reps", "2", "--target-time", "0.001",
    ])
    printed = capsys.readouterr().out
    assert "M=16 K=32 N=48 r=4" in printed and "fwd+bwd" in printed
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == json.loads(json.dumps(records))
    meta, results = lines[0], lines[1:]
    assert meta["type"] == "meta" and meta["machine"]["torch"] == torch.__version__
    assert meta["allocator"] == "default"
    assert {(r["phase"], r["provider"]) for r in results} == {
        (ph, pr) for ph in ("fwd", "bwd", "fwd+bwd") for pr in ("gslora", "reference", "peft", "plain")}
    for r in results:
        assert r["error"] is None, r
        assert r["reps"] == 2 and r["median_s"] > 0 and r["peak_bytes"] is not None
        assert r["baseline"] == "plain"
        assert len(r["times_s"]) == 2 and r["median_s"] == pytest.approx(statistics.median(r["times_s"]))
    plain = [r for r in results if r["provider"] == "plain"]
    assert all(r["ratio_vs_baseline"] == pytest.approx(1.0) for r in plain)
    for r in results:  # the paired ratio, the ratio of medians beside it
        base = next(p for p in plain if p["phase"] == r["phase"])
        assert r["ratio_vs_baseline"] == pytest.approx(harness.paired_ratio(r["times_s"], base["times_s"]))
        assert r["ratio_of_medians"] == pytest.approx(r["median_s"] / base["median_s"])

    md = report.main([str(out)])
    assert "## LoRA linear (issue 2) — cpu, float32" in md
    assert "| M=16 K=32 N=48 r=4 | fwd+bwd | gslora |" in md
    assert "LoRA linear fwd+bwd ≤ 1.10× the frozen plain Linear" in md


def test_bench_lora_linear_dropout_reaches_every_adapter_provider(tmp_path, capsys):
    from benchmarks import bench_lora_linear

    mods, _ = bench_lora_linear.build_providers(["gslora", "reference", "peft", "plain"], 32, 48, 4,
                                                torch.device("cpu"), torch.float32, dropout=0.5)
    x = torch.randn(64, 32)
    for name in ("gslora", "reference", "peft"):
        assert mods[name].training
        diff = mods[name](x) - mods["plain"](x)  # the adapter's term alone
        again = mods[name](x) - mods["plain"](x)
        assert not torch.equal(diff, again), f"{name}: no fresh dropout mask per call"
    records = bench_lora_linear.main([
        "--quick", "--kn", "32x48", "--m", "16", "--r", "4", "--dropout", "0.25",
        "--providers", "gslora,peft,plain", "--out", str(tmp_path / "lora.jsonl"),
        "--warmup", "1", "--min-reps", "2", "--max-reps", "2", "--target-time", "0.001",
    ])
    assert "M=16 K=32 N=48 r=4 p=0.25" in capsys.readouterr().out
    results = [r for r in records if r.get("type") != "meta"]
    assert results and all(r["error"] is None and r["params"]["dropout"] == 0.25 for r in results)
    with pytest.raises(SystemExit):
        bench_lora_linear.main(["--quick", "--dropout", "1.0"])
