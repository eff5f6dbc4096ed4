"""The ``machine`` block every benchmark JSON carries: which host produced the figures.

CPU model, torch's CPU dispatch level (``torch.backends.cpu.get_cpu_capability()``), the
ISA flags that decide fp32/bf16 speed (avx2, avx512f, avx512_bf16, amx), nproc and the load
average, so that a figure measured on a Zen 3 AVX2-only host is never read as one from a
Zen 4 AVX512_BF16 host (issue 17). ``machine()`` is called by every script in this folder.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("unknown", platform.processor()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith(("flags", "Features")) and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, flags


def machine(**extra) -> dict:
    """CPU model, torch CPU capability, ISA flags, nproc, load average (+ ``extra``)."""
    import torch

    model, flags = _cpuinfo()
    try:
        family = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in
                  Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines() if ":" in line)}
        family = f"family {family.get('cpu family', '?')} model {family.get('model', '?')}"
    except OSError:
        family = None
    return {"cpu": model, "cpu_family": family, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "flags": {f: f in flags for f in FLAGS}, "nproc": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "loadavg": [round(x, 2) for x in os.getloadavg()], "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, **extra}


def describe(m: dict) -> str:
    """One line for printed reports."""
    on = [f for f, v in m["flags"].items() if v]
    return (f"{m['cpu']} ({m['cpu_family']}), torch CPU capability {m['torch_cpu_capability']}, "
            f"flags {'/'.join(on) or 'none'}, nproc {m['nproc']}, load {m['loadavg']}")


if __name__ == "__main__":
    print(describe(machine()))
