"""vlmc bench: the figures a run reports, on a tiny cpu artifact (the speeds themselves are
measured by benchmarks, not asserted here)."""
from __future__ import annotations

import pytest

from vlmc.bench import bench, format_report


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from fixtures.checkpoints import build_checkpoint
    folder = tmp_path_factory.mktemp("benchck") / "qwen2_vl"
    build_checkpoint(folder, "qwen2_vl")
    return folder


def test_bench_reports_decode_against_the_read_bandwidth(tiny_checkpoint, tmp_path):
    """On the cpu target the roofline line compares the implied decode bandwidth with the
    machine's read bandwidth measured in the same run."""
    from vlmc.compiler import compile
    from vlmc.kernels import cpu
    if cpu._get_lib() is None:
        pytest.skip("no C compiler")
    art = compile(tiny_checkpoint, tmp_path / "a", target="cpu")
    r = bench(str(art), prompt_lengths=[8], decode_tokens=4, image_size=56)
    ro = r["roofline"]
    assert ro["decode_bytes_per_token"] > 0 and r["decode"]["decode_tps"] > 0
    assert ro["read_bandwidth_gbs"] > 0.5  # a real streaming read, not a placeholder
    assert ro["fraction_of_read_bandwidth"] == pytest.approx(ro["implied_bandwidth_gbs"] / ro["read_bandwidth_gbs"])
    assert f"of the {ro['read_bandwidth_gbs']:.1f} GB/s this machine reads" in format_report(r)
    # which kernels ran: int8 activations and the AMX mode (0 where the CPU has no AMX)
    k = r["system"]["cpu_kernels"]
    assert k == {"int8_activations": cpu.int8_activations(), "amx_mode": cpu.amx()}
    assert f"AMX mode {k['amx_mode']} " in format_report(r)
