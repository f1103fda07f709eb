"""The MFU denominator: datasheet peaks by GPU model and form factor, a measured and cached
CPU peak, and an override; each says where it came from."""
import math

import pytest
import torch

from bigtrain.config import ConfigError
from bigtrain.peak import cpu_peak, gpu_peak, peak_flops


@pytest.mark.parametrize("name, precision, tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989),   # the SXM part reports its memory, not "SXM"
    ("NVIDIA H100 PCIe", "bf16", 756),
    ("NVIDIA H100 NVL", "bf16", 835),
    ("NVIDIA H200", "bf16", 989),
    ("NVIDIA A100-SXM4-80GB", "fp32", 19.5),
    ("Tesla V100-SXM2-16GB", "bf16", 15.7),   # no bf16 tensor cores: its fp32 rate
    ("Tesla V100-PCIE-32GB", "bf16", 14),
    ("NVIDIA L4", "bf16", 121),
    ("NVIDIA L40S", "bf16", 362),
])
def test_gpu_peaks_tell_form_factors_apart(name, precision, tflops):
    peak = gpu_peak(name, precision)
    assert peak.flops == pytest.approx(tflops * 1e12)
    assert "datasheet" in peak.source and precision in peak.source


def test_an_unknown_gpu_gets_no_peak_rather_than_a_guess():
    peak = gpu_peak("NVIDIA Imaginary X9", "bf16")
    assert math.isnan(peak.flops) and "BIGTRAIN_PEAK_FLOPS" in peak.source


def test_the_cpu_peak_is_measured_once_then_the_same_number_every_run(tmp_path, monkeypatch):
    monkeypatch.setenv("BIGTRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr("bigtrain.peak.MATMUL_SIZE", 256)  # keep the test fast; the key records the size
    torch.manual_seed(5)
    first = cpu_peak("fp32")
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))  # measuring did not move the run's RNG (its dropout masks)
    assert first.flops > 0 and "measured now" in first.source
    again = cpu_peak("fp32")
    assert again.flops == first.flops and "cached" in again.source


def test_the_override_wins_and_bad_values_are_one_clear_error(monkeypatch):
    monkeypatch.setenv("BIGTRAIN_PEAK_FLOPS", "2.5e11")
    peak = peak_flops(torch.device("cpu"), "bf16")
    assert peak.flops == 2.5e11 and "BIGTRAIN_PEAK_FLOPS" in peak.source
    monkeypatch.setenv("BIGTRAIN_PEAK_FLOPS", "fast")
    with pytest.raises(ConfigError, match="BIGTRAIN_PEAK_FLOPS"):
        peak_flops(torch.device("cpu"), "bf16")
