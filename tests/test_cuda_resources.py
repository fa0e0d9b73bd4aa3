"""Every CUDA kernel compiles for sm_90 without register spills and within its shared
memory budget (ptxas -v). Needs nvcc, not a GPU; each .cu is compiled once (a few seconds)."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")

# Kernels and the instantiations each .cu must produce (float and double).
EXPECTED = {"jacobi_eigh.cu": ["_jacobi_eigh"], "eigen_scale.cu": ["_eigen_scale"]}
STATIC_SMEM_LIMIT = 48 * 1024  # bytes of static __shared__ without opt-in


def _ptxas_report(source: Path, tmp_path: Path) -> dict:
    """{mangled entry name: ptxas info text} for an sm_90 compile of `source`."""
    cmd = [NVCC, "-arch=sm_90", "-Xptxas", "-v", "-std=c++17", "--expt-relaxed-constexpr",
           f"-I{CSRC}", "-c", str(source), "-o", str(tmp_path / (source.stem + ".o"))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    entries, current = {}, None
    for line in proc.stderr.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for 'sm_90'", line)
        if m:
            current = m.group(1)
            entries[current] = ""
        elif current is not None:
            entries[current] += line + "\n"
    return entries


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_no_spills_and_smem_within_limits(name, tmp_path):
    report = _ptxas_report(CSRC / name, tmp_path)
    for kernel in EXPECTED[name]:
        mine = {k: v for k, v in report.items() if kernel in k}
        assert len(mine) == 2, f"{kernel}: expected float and double instantiations, got {list(report)}"
        for entry, text in mine.items():
            assert "0 bytes spill stores, 0 bytes spill loads" in text, (entry, text)
            smem = re.search(r"(\d+) bytes smem", text)
            assert smem is None or int(smem.group(1)) <= STATIC_SMEM_LIMIT, (entry, text)
            regs = re.search(r"Used (\d+) registers", text)
            assert regs and int(regs.group(1)) <= 128, (entry, text)  # 512 threads x 128 = 64K


def test_every_cu_is_covered():
    assert sorted(p.name for p in CSRC.glob("*.cu")) == sorted(EXPECTED)
