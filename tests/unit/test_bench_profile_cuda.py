"""bench/profile_cuda.py's accounting, on the CPU with a small module: the real-size run needs a GPU."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def prof():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("bench_profile_cuda", REPO / "bench" / "profile_cuda.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(
    ("kernel", "expected"),
    [
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
        ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "matmul"),
        ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "attention"),
        ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "convolution"),
        ("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<float>", "normalisation"),
        ("void at::native::welford_kernel", "normalisation"),
        (
            "void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_32x32_128x2_tn_align8>",
            "matmul",
        ),
        (
            "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>",
            "elementwise",
        ),
        ("void at::native::unrolled_elementwise_kernel<direct_copy_kernel_cuda>", "copies/casts"),
    ],
)
def test_kernels_fall_in_the_category_their_work_belongs_to(prof, kernel: str, expected: str) -> None:  # type: ignore[no-untyped-def]
    assert prof.category(kernel) == expected


def test_a_profiled_part_accounts_its_time_by_category_and_kernel(prof) -> None:  # type: ignore[no-untyped-def]
    lin = torch.nn.Linear(256, 256)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1)
    x, img = torch.randn(64, 256), torch.randn(2, 8, 32, 32)

    def part() -> None:
        with torch.no_grad():
            lin(x)
            conv(img)

    r = prof.profile_part(part, torch.device("cpu"), top=5)
    cats = r["by_category_seconds"]
    assert cats["matmul"] > 0 and cats["convolution"] > 0
    assert sum(cats.values()) == pytest.approx(r["kernel_seconds"])
    assert len(r["top_kernels"]) <= 5
    names = " ".join(k["name"] for k in r["top_kernels"])
    assert "mm" in names and "conv" in names
    assert r["wall_seconds"] > 0
