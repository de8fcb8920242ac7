"""The reference and the fp64 oracle on a GPU host: the same numbers as on the CPU, to fp32 (fp64) rounding.

On a GPU the reference runs fp32 GEMMs without TF32, so only the summation order differs from the CPU's; the fp64
oracle is widened from the same fp32 weights. The comparison with transformers runs on both devices
(tests/test_reference.py); here every tap of both paths is held against the CPU reference and fp64."""

from __future__ import annotations

import pytest
import torch

from fp8parity import metrics
from fp8parity.backends import ReferenceBackend
from fp8parity.config import RunConfig, reference_device
from fp8parity.errors import WorkbookError
from fp8parity.qwen2 import Qwen2Model
from fp8parity.taps import Recorder
from fp8parity.tokenizer import GGUFTokenizer
from fp8parity.workbench import Workbench

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_auto_is_the_gpu_where_there_is_one_and_cuda_without_one_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert reference_device("auto") == "cpu" and reference_device("cpu") == "cpu"
    with pytest.raises(WorkbookError, match="REFERENCE_DEVICE=cuda needs a CUDA GPU"):
        reference_device("cuda")
    with pytest.raises(WorkbookError, match="is unknown"):
        reference_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert reference_device("auto") == "cuda"


def test_reports_name_the_reference_device(tiny_path, tmp_path):
    wb = Workbench(RunConfig(model=str(tiny_path), backend="reference", reference_device="cpu"), tmp_path)
    assert wb.provenance()["reference"]["device"] == "cpu"
    assert "**reference** fp32 on `cpu`" in wb.provenance_markdown()
    assert wb.oracle.device.type == "cpu" and wb.oracle.dtype == torch.float64


def _taps(model: Qwen2Model, ids: list[int], path: str) -> dict:
    rec = Recorder()
    model.run(ids, path, rec)
    return rec.tensors


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("path", ["prefill", "decode"])
def test_gpu_reference_is_as_close_to_fp64_as_the_cpu_reference(tiny, path):
    ids = GGUFTokenizer(tiny).chat_ids("Write a Python function that reverses a string.")
    cpu = _taps(Qwen2Model(tiny), ids, path)
    gpu_model = Qwen2Model(tiny, backend=ReferenceBackend("cuda"))
    gpu = _taps(gpu_model, ids, path)
    fp64 = Qwen2Model(tiny, dtype=torch.float64).run(ids, path)
    assert not torch.backends.cuda.matmul.allow_tf32 and gpu_model.backend.describe()["tf32"] is False
    assert cpu.keys() == gpu.keys()
    worst = max(metrics.rel_l2(gpu[k], cpu[k]) for k in cpu)
    logits = {side: torch.stack([t[(p, -1, "logits")] for p in range(len(ids))]) for side, t in (("cpu", cpu), ("gpu", gpu))}
    to64 = {side: metrics.rel_l2(v, fp64) for side, v in logits.items()}
    print(f"{path}: GPU vs CPU reference, worst tap rel. L2 {worst:.2e}; logits vs fp64: CPU {to64['cpu']:.2e}, "
          f"GPU {to64['gpu']:.2e}")
    assert float(fp64.abs().max()) > 0.1, "never on zeros"
    # fp32 rounding in another summation order: each side ~2e-6 from fp64 (TF32 would put the GPU at ~1e-3)
    assert worst < 1e-5 and to64["gpu"] < 2 * to64["cpu"] + 1e-7


@pytest.mark.gpu
@needs_gpu
def test_gpu_oracle_is_fp64_and_judges_the_gpu_reference(tiny_path, tmp_path):
    wb = Workbench(RunConfig(model=str(tiny_path), backend="reference", reference_device="cuda"), tmp_path)
    ids = wb.prompt_ids(0)
    gpu64 = wb.oracle.prefill(ids).cpu()
    cpu64 = Qwen2Model(wb.gguf, dtype=torch.float64).prefill(ids)
    ref32 = wb.reference.prefill(ids).cpu()
    assert wb.oracle.device.type == "cuda" and gpu64.dtype == torch.float64
    print(f"fp64 GPU vs CPU {metrics.rel_l2(gpu64, cpu64):.2e}; fp32 GPU reference vs fp64 {metrics.rel_l2(ref32, gpu64):.2e}")
    # not 1e-15: the RoPE tables are fp32 on both devices (as transformers makes them), and CUDA's cos/sin differ from
    # the CPU's by an ulp (6.8e-8, the rope floor's GPU measurement); still 40x under the fp32 reference's distance
    assert metrics.rel_l2(gpu64, cpu64) < 2e-7
    assert metrics.rel_l2(ref32, gpu64) < 1e-5 and metrics.rel_l2(gpu64, cpu64) < metrics.rel_l2(ref32, gpu64) / 10


def test_a_gpu_host_runs_as_many_notebooks_at_once_as_the_card_holds(tiny_path, monkeypatch):
    """Each notebook holds the reference's fp32 weights and the candidate's on the card: a 7B's take 69 GB with te."""
    from types import SimpleNamespace

    from fp8parity import runner

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _: SimpleNamespace(total_memory=143 * 2**30))
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    cfg = RunConfig(model=str(tiny_path), backend="te")
    assert runner.jobs_here(cfg) == 5  # the tiny model: the cores decide (one notebook per 3)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert runner.jobs_here(cfg) == 2
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    seven_b = int(7.6e9 * 4)
    per_notebook = runner.gpu_bytes_per_notebook
    monkeypatch.setattr(runner, "gpu_bytes_per_notebook", lambda c, b: per_notebook(c, seven_b))
    # the reference's fp32 weights on the card, which te borrows, and te's FP8 copy: 39 GB, three at once
    assert 38e9 < per_notebook(cfg, seven_b) < 40e9 and runner.jobs_here(cfg) == 3
    assert per_notebook(RunConfig(model=str(tiny_path), backend="bf16"), seven_b) > 45e9  # bf16 holds its own copy
    assert runner.jobs_here(RunConfig(model=str(tiny_path), backend="te", reference_device="cpu")) == 3  # te's only
    assert runner.jobs_here(RunConfig(model=str(tiny_path), backend="te", jobs=3)) == 3  # JOBS decides when given


def test_a_cpu_host_runs_one_notebook_per_core_as_its_memory_allows(tiny_path):
    from fp8parity.runner import host_jobs

    cfg, gb = RunConfig(model=str(tiny_path), backend="emulated-fp8"), 2**30
    assert host_jobs(cfg, int(1.98e9), cores=2, memory_bytes=24 * gb) == 2  # the default model on the CI VM
    assert host_jobs(cfg, int(1.98e9), cores=16, memory_bytes=24 * gb) == 3  # memory decides: 5 GB each
    assert host_jobs(cfg, int(30.4e9), cores=2, memory_bytes=24 * gb) == 1  # a 7B: never fewer than one
    assert host_jobs(RunConfig(model=str(tiny_path), backend="reference"), int(30.4e9), 2, 64 * gb) == 2  # no copies
