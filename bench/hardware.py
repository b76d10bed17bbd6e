"""Peak dense bf16 throughput per GPU, for MFU. Looked up by the name CUDA reports.

Figures are the vendors' dense (no sparsity) bf16 tensor-core peaks. A GPU that is not
in the table gets no MFU (None) rather than a guessed one.
"""

# Most specific names first: "H100 PCIe" must match before "H100".
PEAK_BF16_FLOPS = [
    ("B200", 2250e12),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM / HBM3
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
]


def peak_flops(gpu_name: str | None) -> float | None:
    if not gpu_name:
        return None
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in gpu_name.lower():
            return flops
    return None


def mfu(flops_per_token: float, tokens_per_sec: float, gpu_name: str | None) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s over the GPU's peak, or None."""
    peak = peak_flops(gpu_name)
    return None if peak is None else flops_per_token * tokens_per_sec / peak
