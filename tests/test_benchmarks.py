"""The benchmarks' quick paths: they run end to end on the tiny base (numbers meaningless)."""

import importlib.util
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def serve_engine():
    spec = importlib.util.spec_from_file_location("serve_engine", BENCHMARKS / "serve_engine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)  # main() sets --threads for the whole process


def test_serve_engine_random_base_options_run_on_cpu_and_rows_match_peft(serve_engine, tiny_base, tmp_path, capsys):
    """The GPU column's path (--save-arch, --random-base, --device, --adapters, part d), run on the CPU."""
    arch = tmp_path / "arch"
    serve_engine.main(["--base", tiny_base, "--save-arch", str(arch)])
    assert (arch / "config.json").is_file() and (arch / "tokenizer.json").is_file()
    assert not list(arch.glob("*.safetensors"))  # architecture and tokenizer only: small enough to carry

    serve_engine.main([
        "--random-base", str(arch), "--device", "cpu", "--threads", "1", "--parts", "dbc",
        "--adapters", "8,9", "--tokens", "2", "--repeats", "1", "--check-dtypes", "float32,bfloat16",
    ])
    out = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in out  # a random base is never reported as the real one
    assert "| float32: 8 adapters + base in one batch" in out and "PASS (goal < 1e-4)" in out
    assert "| bfloat16 vs PEFT float32" in out and "FAIL" not in out
    assert "mixed batch, 8 adapters x 2 tokens" in out and "mixed batch, 9 adapters x 2 tokens" in out
    assert "memory for N=9 resident adapters" in out


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["update", "serve_http"])
def test_benchmarks_take_device_and_dtype_and_refuse_a_missing_gpu_before_any_work(name, monkeypatch, capsys):
    from persona.errors import DeviceUnavailable

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    module = _load(name)
    with pytest.raises(SystemExit):
        module.main(["--help"])
    assert "--device" in capsys.readouterr().out
    with pytest.raises(DeviceUnavailable):
        module.main(["--device", "cuda", "--dtype", "bfloat16"])


def test_gpu_script_prints_its_usage_and_names_every_step():
    import subprocess

    result = subprocess.run(["bash", str(BENCHMARKS / "gpu.sh")], capture_output=True, text=True)
    assert result.returncode == 2 and "bash benchmarks/gpu.sh run" in result.stdout
    script = (BENCHMARKS / "gpu.sh").read_text()
    for step in ("serve_engine", "serve_http", "update", "update_many"):
        assert f"step {step} " in script


def test_materialize_quick_run_builds_reuses_and_checks_exactness(capsys):
    module = _load("materialize")
    module.main(["--quick"])
    out = capsys.readouterr().out
    for label in ("2-part stack", "3-part stack", "layered adapter (2 parts)"):
        assert f"| {label} |" in out
    assert out.count("| PASS |") == 3 and "FAIL" not in out and "float32 floor" in out


def test_gateway_benchmark_quick_path_reports_a_ratio_per_way(capsys):
    module = _load("gateway")
    module.main(["--quick", "--requests", "2", "--tokens", "4", "--threads", "1"])
    out = capsys.readouterr().out
    assert "TINY RANDOM MODEL" in out and "ratio (goal <= 1.10)" in out
    assert "| whole answer |" in out and "| streamed: to [DONE] |" in out


def test_serve_load_quick_path_reports_continuous_batching_against_single_requests(capsys):
    module = _load("serve_load")
    threads = torch.get_num_threads()
    try:
        module.main(["--quick", "--requests", "4", "--threads", "1", "--load", "10"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "| p50 TTFT / single |" in out and "arrival rate:" in out and "(10.0 per" in out
    assert "static" not in out.lower()
    assert "first token, mean of 4: queue" in out and " decode (mean " in out  # where the time to first token went
    assert "identical to the same requests alone (2 compared): True" in out  # greedy: the same text under load


def test_memory_benchmark_quick_path_reports_every_measure(capsys):
    module = _load("memory")
    module.main(["--quick", "--users", "1", "--repeats", "1", "--tokens", "4", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "QUICK: tiny random model" in out
    for label in ("fresh adapter, memory off", "fresh adapter, memory on", "trained adapter, memory off",
                  "trained adapter + memory"):
        assert f"| {label} |" in out
    assert "## Overhead on a 32-token request" in out and "| 200 |" in out


def test_update_many_quick_path_prints_where_the_single_update_goes(capsys):
    """The benchmark reports each phase's passes of the base and tokens (issue 15: where the time goes), CPU
    seconds beside wall time, and passes --tokens-per-step to the batched mode."""
    module = _load("update_many")
    module.main(["--quick", "--single-only"])
    out = capsys.readouterr().out
    for phase in module.PHASES:
        assert f"persona phase: {phase}:" in out
    assert "persona phase: train: 2 passes (2 with backward)" in out  # 11 training rows in batches of 8, 1 epoch
    assert "persona phase: evaluate parent: 1 passes (0 with backward)" in out  # held-out + replay: one pass
    assert "plain loop training: 2 passes with backward" in out
