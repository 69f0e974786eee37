"""MFU's denominator is the device's datasheet peak (telemetry/peak.py), not a measured matmul.
The figures are restated from the vendors' datasheets (dense, no sparsity; per torch device)."""

from __future__ import annotations

import pytest
import torch

from tierzero.recipes.config import TrainConfig
from tierzero.recipes.trainer import peak_tflops_of
from tierzero.telemetry.peak import datasheet_peak_tflops

# torch.cuda.get_device_name as these devices report themselves -> (bf16, fp32) TFLOPS
CASES = [
    ("NVIDIA H100 80GB HBM3", 989.4, 66.9),   # SXM5: 1,979 bf16 with sparsity
    ("NVIDIA H100 PCIe", 756.0, 51.2),
    ("NVIDIA H100 NVL", 835.0, 60.0),
    ("NVIDIA H200", 989.4, 66.9),
    ("NVIDIA GH200 480GB", 989.4, 66.9),
    ("NVIDIA A100-SXM4-80GB", 312.0, 19.5),
    ("NVIDIA A100 80GB PCIe", 312.0, 19.5),
    ("AMD Instinct MI300X", 1307.4, 163.4),
    ("AMD Instinct MI250X", 191.5, 23.95),   # one GCD: half of the package's 383 / 47.9
]


@pytest.mark.parametrize("name,bf16,fp32", CASES)
def test_datasheet_peaks(name, bf16, fp32):
    assert datasheet_peak_tflops(name, "bfloat16") == bf16
    assert datasheet_peak_tflops(name, "float32") == fp32


def test_an_unknown_device_has_no_datasheet_figure():
    assert datasheet_peak_tflops("NVIDIA GeForce GTX 1080", "bfloat16") is None


def test_the_trainer_divides_by_the_datasheet_on_a_gpu_and_measures_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert peak_tflops_of(TrainConfig(dtype="bfloat16"), "cuda:0") == 989.4
    cpu = peak_tflops_of(TrainConfig(), "cpu")
    assert 0 < cpu < 100  # a measured matmul on this host's cores
