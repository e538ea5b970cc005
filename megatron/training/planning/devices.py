"""Device figures the planner uses: memory, dense peak FLOP/s, memory and link bandwidths.

All values are per device, from the vendors' published datasheets (named next to each entry);
bandwidths are per direction. Every figure can be overridden (see `with_overrides` and the
`tools/plan_layout.py` flags). FP32 matrix peaks are the vendors' non-tensor-core FP32 figures
where published; Gaudi publishes no dense FP32 matrix figure, so a quarter of BF16 is assumed.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

GB = 10**9  # vendors quote decimal gigabytes
TERA = 10**12


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    memory_bytes: int
    peak_flops: Dict[str, float]  # dense matrix FLOP/s by params dtype ("bfloat16", "float32")
    memory_bandwidth: float  # bytes/s (HBM or DRAM)
    scale_up_bandwidth: float  # bytes/s per device and direction inside a node (NVLink / on-chip RoCE)
    scale_out_bandwidth: float  # bytes/s per device and direction between nodes (IB / RoCE NICs)
    devices_per_node: int
    native_collectives: bool  # nccl / hccl (reduce-scatter exists); False: gloo on CPU
    source: str
    # Parameter dtypes with a torch grouped_mm kernel (moe/experts.py): CPU fp32 and bf16, CUDA
    # bf16, none on Gaudi (the experts loop over their rows there).
    grouped_mm_dtypes: Tuple[str, ...] = ()
    kind: str = "cuda"  # the device layer's kind: "hpu", "cuda" or "cpu"

    def peak(self, dtype: str) -> float:
        if dtype in self.peak_flops:
            return self.peak_flops[dtype]
        return self.peak_flops["bfloat16"]


DEVICES: Dict[str, DeviceSpec] = {
    # Intel Gaudi 2 AI accelerator (HL-225H) datasheet: 96 GB HBM2E at 2.46 TB/s, 432 TFLOPS BF16
    # (MME); 24 x 100 GbE RoCE on chip, 21 for all-to-all inside an 8-card server, 3 to scale out.
    "gaudi2": DeviceSpec(
        name="Intel Gaudi 2 (96 GB)", memory_bytes=96 * GB,
        peak_flops={"bfloat16": 432 * TERA, "float32": 108 * TERA},
        memory_bandwidth=2.46e12, scale_up_bandwidth=21 * 100e9 / 8, scale_out_bandwidth=3 * 100e9 / 8,
        devices_per_node=8, native_collectives=True, source="Intel Gaudi 2 AI accelerator datasheet (HL-225H)",
        kind="hpu",
    ),
    # Intel Gaudi 3 AI accelerator white paper (HL-325L OAM): 128 GB HBM2e at 3.7 TB/s, 1835 TFLOPS
    # BF16 (MME); 24 x 200 GbE RoCE, 21 inside the server, 3 to scale out.
    "gaudi3": DeviceSpec(
        name="Intel Gaudi 3 (128 GB)", memory_bytes=128 * GB,
        peak_flops={"bfloat16": 1835 * TERA, "float32": 1835 * TERA / 4},
        memory_bandwidth=3.7e12, scale_up_bandwidth=21 * 200e9 / 8, scale_out_bandwidth=3 * 200e9 / 8,
        devices_per_node=8, native_collectives=True, source="Intel Gaudi 3 AI accelerator white paper (HL-325L)",
        kind="hpu",
    ),
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5): 80 GB HBM3 at 3.35 TB/s, 989 TFLOPS BF16 dense,
    # 67 TFLOPS FP32; NVLink 900 GB/s (both directions); DGX H100: one 400 Gb/s ConnectX-7 per GPU.
    "h100": DeviceSpec(
        name="NVIDIA H100 SXM (80 GB)", memory_bytes=80 * GB,
        peak_flops={"bfloat16": 989 * TERA, "float32": 67 * TERA},
        memory_bandwidth=3.35e12, scale_up_bandwidth=450e9, scale_out_bandwidth=400e9 / 8,
        devices_per_node=8, native_collectives=True, source="NVIDIA H100 Tensor Core GPU datasheet (SXM5)",
        grouped_mm_dtypes=("bfloat16",),
    ),
    # NVIDIA H200 Tensor Core GPU datasheet (SXM): 141 GB HBM3e at 4.8 TB/s, 989 TFLOPS BF16 dense,
    # 67 TFLOPS FP32; NVLink 900 GB/s; HGX H200: one 400 Gb/s NIC per GPU.
    "h200": DeviceSpec(
        name="NVIDIA H200 SXM (141 GB)", memory_bytes=141 * GB,
        peak_flops={"bfloat16": 989 * TERA, "float32": 67 * TERA},
        memory_bandwidth=4.8e12, scale_up_bandwidth=450e9, scale_out_bandwidth=400e9 / 8,
        devices_per_node=8, native_collectives=True, source="NVIDIA H200 Tensor Core GPU datasheet (SXM)",
        grouped_mm_dtypes=("bfloat16",),
    ),
    # H800 SXM (DeepSeek-V3's cluster): H100 compute and memory; DeepSeek-V3 technical report,
    # section 3.1 / 3.2.2: NVLink 160 GB/s and InfiniBand 50 GB/s per GPU.
    "h800": DeviceSpec(
        name="NVIDIA H800 SXM (80 GB)", memory_bytes=80 * GB,
        peak_flops={"bfloat16": 989 * TERA, "float32": 67 * TERA},
        memory_bandwidth=3.35e12, scale_up_bandwidth=160e9, scale_out_bandwidth=50e9,
        devices_per_node=8, native_collectives=True, source="DeepSeek-V3 technical report (H800 cluster)",
        grouped_mm_dtypes=("bfloat16",),
    ),
}


def host_memory_bytes() -> int:
    """Physical memory of this machine (the default for --device-type cpu)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 64 * GB


def cpu_device(memory_bytes: Optional[int] = None, num_devices: int = 1) -> DeviceSpec:
    """CPU ranks on one host, gloo over loopback. Nominal figures (no vendor datasheet applies):
    0.1 TFLOP/s per rank, 10 GB/s DRAM and 2 GB/s between ranks; override them with measurements."""
    return DeviceSpec(
        name="CPU", memory_bytes=memory_bytes if memory_bytes is not None else host_memory_bytes(),
        peak_flops={"bfloat16": 0.1 * TERA, "float32": 0.1 * TERA},
        memory_bandwidth=10e9, scale_up_bandwidth=2e9, scale_out_bandwidth=2e9,
        devices_per_node=max(1, num_devices), native_collectives=False, source="nominal (CPU host, gloo)",
        grouped_mm_dtypes=("float32", "bfloat16"), kind="cpu",
    )


DEVICE_TYPES = tuple(DEVICES) + ("cpu",)


def get_device(
    device_type: str,
    *,
    memory_gb: Optional[float] = None,
    peak_tflops: Optional[float] = None,
    scale_up_gbps: Optional[float] = None,
    scale_out_gbps: Optional[float] = None,
    devices_per_node: Optional[int] = None,
    num_devices: int = 1,
) -> DeviceSpec:
    """The spec of `device_type`, with any given figure replaced (GB = 1e9 bytes, GB/s per direction)."""
    if device_type == "cpu":
        spec = cpu_device(None if memory_gb is None else int(memory_gb * GB), num_devices)
    elif device_type in DEVICES:
        spec = DEVICES[device_type]
    else:
        raise ValueError(f"unknown device type {device_type!r}; choose one of {', '.join(DEVICE_TYPES)}")
    changes: Dict[str, object] = {}
    if memory_gb is not None:
        if memory_gb <= 0:
            raise ValueError(f"--device-memory-gb must be positive, got {memory_gb}")
        changes["memory_bytes"] = int(memory_gb * GB)
    if peak_tflops is not None:
        if peak_tflops <= 0:
            raise ValueError(f"--peak-tflops must be positive, got {peak_tflops}")
        changes["peak_flops"] = {"bfloat16": peak_tflops * TERA, "float32": peak_tflops * TERA}
    for key, value, flag in (("scale_up_bandwidth", scale_up_gbps, "--scale-up-gbps"),
                             ("scale_out_bandwidth", scale_out_gbps, "--scale-out-gbps")):
        if value is not None:
            if value <= 0:
                raise ValueError(f"{flag} must be positive, got {value}")
            changes[key] = value * GB
    if devices_per_node is not None:
        if devices_per_node < 1:
            raise ValueError(f"--devices-per-node must be >= 1, got {devices_per_node}")
        changes["devices_per_node"] = devices_per_node
    return dataclasses.replace(spec, **changes) if changes else spec
