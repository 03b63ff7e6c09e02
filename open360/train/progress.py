"""Progress display (tqdm bar or periodic log lines), throughput/MFU, and the end-of-run summary table."""

from __future__ import annotations

import re
import sys
import time
from typing import Any

import torch

# Dense bf16 peak FLOP/s by device-name fragment, the first that matches (H100 SXM figure as in
# shared/BENCHMARKS.md; the PCIe and NVL cards from NVIDIA's H100, H200 and H800 datasheets).
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H800 PCIe": 756e12,
    "H100": 989e12,
    "H200 NVL": 835e12,
    "H200": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
}


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of a CUDA device (of its share of the card under MIG), or None when unknown (MFU
    is then not shown)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)
    mig = re.search(r"MIG (\d)g\.", name)  # a MIG slice ("... MIG 3g.40gb") has g of the card's 7 compute slices
    return peak * int(mig.group(1)) / 7 if peak is not None and mig else peak


class Progress:
    """Shows step, loss, tokens/s, MFU (bf16 on a known GPU) and ETA: a tqdm bar on a terminal, else a line
    every N steps."""

    def __init__(self, total_steps: int, start_step: int, log_every: int, enabled: bool, bar: bool) -> None:
        self.total = total_steps
        self.log_every = max(1, log_every)
        self.enabled = enabled
        self.start_step = start_step
        self._t0 = time.perf_counter()
        self._bar = None
        if enabled and bar and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def update(self, step: int, metrics: dict[str, float]) -> None:
        """Report completed step `step` with its metrics."""
        if not self.enabled:
            return
        fields = {
            "loss": f"{metrics['loss']:.4f}",
            "lr": f"{metrics['lr']:.2e}",
            "gnorm": f"{metrics['grad_norm']:.4g}",
            "tok/s": f"{metrics['tokens_per_s']:,.0f}",
        }
        if "mfu" in metrics:
            fields["mfu"] = f"{100 * metrics['mfu']:.1f}%"
        if self._bar is not None:
            self._bar.set_postfix(fields, refresh=False)
            self._bar.update(step - self._bar.n)
            return
        if step % self.log_every == 0 or step == self.total:
            elapsed = time.perf_counter() - self._t0
            done = step - self.start_step
            eta = elapsed / done * (self.total - step) if done else float("nan")
            text = " ".join(f"{k} {v}" for k, v in fields.items())
            print(f"step {step}/{self.total} {text} eta {format_seconds(eta)}", flush=True)

    def message(self, text: str) -> None:
        """Print a line without breaking the bar."""
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def format_seconds(seconds: float) -> str:
    """`1h02m03s` style duration."""
    if seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-run summary as an aligned two-column table."""
    rows = []
    for key, value in summary.items():
        if isinstance(value, float):
            value = f"{value:.6g}"
        elif isinstance(value, list | dict):
            continue
        rows.append((key, str(value)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(["run summary", "-" * (width + 24)] + [f"{k:<{width}}  {v}" for k, v in rows])
