"""The machine a benchmark ran on, and the command that ran it: what every result records."""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from pipeline.model import decoder_linear_layers, synchronize


def matmul_peak_gflops(dtype: torch.dtype, max_size: int = 2048, budget_s: float = 1.0, device: str = "cpu") -> float:
    """GFLOP/s of square matmuls in ``dtype`` on ``device``, the largest size up to ``max_size``
    that fits the budget.

    Fixed 2048-wide products took minutes where bf16 is emulated (0.3 GFLOP/s on an AVX2-only CPU):
    the size doubles only while one product stays well inside the budget.
    """
    size, seconds = 256, 0.0
    while True:
        a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
        if device != "cpu":
            a @ b  # a GPU's first product also starts its BLAS library: never the one timed
        synchronize()
        seconds = matmul_seconds(a, b)  # also the warm-up
        if size >= max_size or seconds * 8 > budget_s / 4:  # the next size costs 8x
            break
        size *= 2
    repeat = max(1, min(5, int(budget_s / max(seconds, 1e-9))))
    # best of three: on a shared 2-core VM one timing came out at 40% of the others
    best = min(matmul_seconds(a, b, repeat) for _ in range(3))
    return 2 * size**3 * repeat / best / 1e9


def matmul_seconds(a: torch.Tensor, b: torch.Tensor, repeat: int = 1) -> float:
    """Seconds for ``repeat`` products ``a @ b``, a GPU's queue drained before the clock stops."""
    start = time.perf_counter()
    for _ in range(repeat):
        a @ b
    synchronize()
    return time.perf_counter() - start


def linear_shapes_gflops(model, rows: int, dtype: torch.dtype, budget_s: float = 1.0) -> dict[str, Any]:
    """GFLOP/s of the model's own matrix products: each distinct ``nn.Linear`` shape of the decoder
    (the output head left out) at ``rows`` tokens a product, weighted by how often the model runs it.

    This is the ceiling a labeler of this model can reach at that batch even if everything but the
    matrix products were free: 576-wide layers at a few hundred rows run well below a square
    2048-wide product's rate, which is what :func:`matmul_peak_gflops` measures.
    """
    counts = Counter((module.in_features, module.out_features) for _, module in decoder_linear_layers(model))
    flops = seconds = 0.0
    shapes = []
    for (inputs, outputs), count in sorted(counts.items()):
        x = torch.randn(rows, inputs, dtype=dtype)
        w = torch.randn(inputs, outputs, dtype=dtype)
        x @ w  # warm-up: oneDNN builds its kernel for the shape on first use
        repeat = max(3, int(budget_s / len(counts) / max(matmul_seconds(x, w), 1e-6)))
        best = min(matmul_seconds(x, w, repeat) for _ in range(3)) / repeat
        shapes.append({"in": inputs, "out": outputs, "layers": count,
                       "gflops": round(2 * rows * inputs * outputs / best / 1e9, 1)})
        flops += 2.0 * rows * inputs * outputs * count
        seconds += best * count
    return {"rows": rows, "dtype": str(dtype).removeprefix("torch."), "gflops": round(flops / seconds / 1e9, 1),
            "shapes": shapes}


RELEVANT_CPU_FLAGS = ("amx_tile", "amx_bf16", "amx_int8", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni",
                      "avx2")


def machine(device: str | None = None) -> dict[str, Any]:
    """What a throughput figure depends on: results from different machines are not comparable
    (one dev machine had AMX, bf16 matmuls at 5.9x fp32's rate; another had neither AMX nor
    AVX512-BF16, bf16 at a third to half of fp32's)."""
    from pipeline.model import cpu_flags, cpu_has_native_bf16

    cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), None) if Path("/proc/cpuinfo").is_file() else None
    flags = cpu_flags()
    record = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
              "device": device, "cpu": cpu_model, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "cpu_flags": [f for f in RELEVANT_CPU_FLAGS if f in flags], "cpu_native_bf16": cpu_has_native_bf16(flags),
              "matmul_peak_gflops": {"fp32": round(matmul_peak_gflops(torch.float32), 1),
                                     "bf16": round(matmul_peak_gflops(torch.bfloat16), 1)}}
    if device and device.startswith("cuda"):
        # fp32 without TF32 (torch's default for matmuls), as the fp32 paths run
        record.update({"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda,
                       "gpu_memory_gib": round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1),
                       "gpu_matmul_peak_gflops": {
                           dtype: round(matmul_peak_gflops(getattr(torch, name), 8192, 2.0, device), 1)
                           for dtype, name in (("fp32", "float32"), ("bf16", "bfloat16"))}})
    return record


def command_line() -> str:
    """The command that is running, as a user would retype it."""
    script = Path(sys.argv[0])
    module = f"pipeline.{script.parent.name}" if script.name == "__main__.py" else f"{script.parent.name}.{script.stem}"
    program = f"python -m {module}" if module in ("pipeline.bench", "pipeline.analysis") else sys.argv[0]
    return " ".join([program, *sys.argv[1:]])
