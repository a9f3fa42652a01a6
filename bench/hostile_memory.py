"""`python -m bench.hostile_memory`: the gateway's memory under a mix of worst-case inputs.

Starts `brainscan-server` (embedded backend, default settings unless --env says
otherwise), measures its idle RSS after one warm-up request, then sends a
shuffled mix at concurrency 32: decompression bombs and header lies that must be
refused from the header, images just inside the per-request decoded-pixel budget
that are decoded in full (PNG 8-bit gray and 16-bit RGBA, JPEG, a 128-frame RLE
DICOM through AnalyzeStream), damaged data, and ordinary valid slices. Prints the
gateway's peak RSS (VmHWM, reset after the warm-up) against the idle RSS, the
status codes per kind, and whether every valid request succeeded. Exits 1 when
a valid request failed, a hostile one got INTERNAL/UNKNOWN, or the peak is over
--max-peak-mb.

Research use only; not a medical device.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import random
import struct
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import grpc
import numpy as np

from bench import processes
from bench.dicom_series import mr_series
from brainscan_proto.v1 import brainscan_pb2 as pb
from brainscan_proto.v1 import brainscan_pb2_grpc as pb_grpc
from gateway.config import PROJECT_ROOT, GatewayConfig
from bench.triton_perf import default_images, find_images

CONCURRENCY = 32
LIMIT_SIDE = int(GatewayConfig().max_request_pixels ** 0.5)  # the largest square inside the per-request budget


@dataclass(frozen=True)
class Probe:
    kind: str
    request: pb.AnalyzeRequest
    valid: bool  # must succeed (within the budgets, if only just); else it must be refused as a client error
    stream: bool = False


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.hostile_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-repository", type=Path, default=PROJECT_ROOT / "model_repository")
    parser.add_argument("--valid", type=int, default=96, help="ordinary valid slices in the mix (default 96)")
    parser.add_argument("--repeat", type=int, default=3, help="copies of each hostile input (default 3)")
    parser.add_argument("--max-peak-mb", type=float, default=1536.0, help="exit 1 above this peak RSS (default 1536)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="gateway setting, repeatable")
    parser.add_argument("--seed", type=int, default=0)
    return parser


# --- inputs --------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_of_zeros(width: int, height: int, *, colour_type: int = 0, depth: int = 8) -> bytes:
    """A valid PNG of black pixels: kilobytes on the wire, width × height when decoded."""
    samples = {0: 1, 6: 4}[colour_type]
    row = b"\x00" * (1 + width * samples * depth // 8)
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    sof0 = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + sof0 + b"\xff\xd9"


def rle_dicom_of_zeros(frames: int, side: int) -> bytes:
    """A 16-bit RLE Lossless DICOM of `frames` black side×side frames, built segment by segment (fast)."""
    import pydicom
    from pydicom.encaps import encapsulate

    run = b"\x81\x00"  # repeat the next byte 128 times
    segment = run * (side * side // 128)
    header = struct.pack("<16I", 2, 64, 64 + len(segment), *([0] * 13))
    frame = header + segment + segment
    dataset = pydicom.dcmread(io.BytesIO(_dicom_of_zeros(side)))
    dataset.NumberOfFrames = frames
    dataset.file_meta.TransferSyntaxUID = pydicom.uid.RLELossless
    dataset.PixelData = encapsulate([frame] * frames)
    dataset["PixelData"].VR = "OB"
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def dicom_header_lie() -> bytes:
    """Rows and Columns 8192 with 2 KB of pixel data."""
    data = bytearray(_dicom_of_zeros(32))
    for tag, value in ((b"\x28\x00\x10\x00US\x02\x00", 8192), (b"\x28\x00\x11\x00US\x02\x00", 8192)):
        at = data.index(tag) + len(tag)
        data[at : at + 2] = struct.pack("<H", value)
    return bytes(data)


def _dicom_of_zeros(side: int) -> bytes:
    return mr_series(np.zeros((1, side, side), np.uint16))[0]


def valid_slices(count: int) -> list[bytes]:
    """Real Testing slices when the datasets are there, else 512² noise PNGs (valid images all the same)."""
    folder = default_images()
    files = find_images([folder], count) if folder.is_dir() else []
    slices = [path.read_bytes() for path in files]
    rng = np.random.default_rng(1)
    while len(slices) < count:
        slices.append(cv2.imencode(".png", rng.integers(0, 255, (512, 512), dtype=np.uint8))[1].tobytes())
    return slices


def probes(args: argparse.Namespace) -> list[Probe]:
    side = LIMIT_SIDE
    flat = np.full((side, side), 40, np.uint8)
    good_jpeg = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 255, (512, 512), dtype=np.uint8))[1].tobytes()
    hostile = {
        "PNG 8192² bomb (refused: budget)": png_of_zeros(8192, 8192),
        f"PNG {side}² 8-bit (decoded)": png_of_zeros(side, side),
        f"PNG {side}² 16-bit RGBA (decoded)": png_of_zeros(side, side, colour_type=6, depth=16),
        "JPEG 60000² header (refused: side)": jpeg_claiming(60000, 60000),
        f"JPEG {side}² (decoded)": cv2.imencode(".jpg", flat)[1].tobytes(),
        "JPEG cut and re-terminated (refused: damaged)": good_jpeg[: len(good_jpeg) // 2] + b"\xff\xd9",
        "DICOM 128×512² RLE via Analyze (refused: multi-frame)": rle_dicom_of_zeros(128, 512),
        "DICOM header says 8192², 2 KB of pixels (refused)": dicom_header_lie(),
    }
    mix = [Probe(kind, pb.AnalyzeRequest(encoded=data), valid="(decoded)" in kind) for kind, data in hostile.items()]
    mix.append(Probe("DICOM 128×512² RLE via AnalyzeStream (decoded)",
                     pb.AnalyzeRequest(encoded=hostile["DICOM 128×512² RLE via Analyze (refused: multi-frame)"]),
                     valid=True, stream=True))
    overflow = pb.RawPixels(data=b"\x00" * 64, shape=[2**31, 2**31], dtype="float64")
    mix.append(Probe("raw shape 2³¹×2³¹ (refused)", pb.AnalyzeRequest(raw=overflow), valid=False))
    mix = [probe for probe in mix for _ in range(args.repeat)]
    mix += [Probe("valid slice (Testing JPEG)", pb.AnalyzeRequest(encoded=data), valid=True) for data in valid_slices(args.valid)]
    random.Random(args.seed).shuffle(mix)
    return mix


# --- running ---------------------------------------------------------------------


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def _sample_peak(pid: int, stop: threading.Event, peak: list[int]) -> None:
    # VmHWM is the kernel's own peak; sampling VmRSS as well covers kernels where clear_refs is refused.
    while not stop.is_set():
        peak[0] = max(peak[0], _status_kib(pid, "VmRSS"))
        stop.wait(0.02)


async def _send(stub: pb_grpc.BrainScanStub, probe: Probe) -> str:
    try:
        if probe.stream:
            codes = [r.error.code or "OK" async for r in stub.AnalyzeStream(iter([probe.request]), timeout=300)]
            return "OK" if codes and all(c == "OK" for c in codes) else ",".join(sorted(set(codes)))
        await stub.Analyze(probe.request, timeout=300)
        return "OK"
    except grpc.aio.AioRpcError as error:
        return error.code().name


async def drive(address: str, mix: list[Probe]) -> dict[str, collections.Counter]:
    outcomes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    queue = list(reversed(mix))
    options = [("grpc.max_send_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = pb_grpc.BrainScanStub(channel)

        async def worker() -> None:
            while queue:
                probe = queue.pop()
                outcomes[probe.kind][await _send(stub, probe)] += 1

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return outcomes


def main(args: argparse.Namespace) -> int:
    env = dict(item.split("=", 1) for item in args.env)
    started = time.perf_counter()
    mix = probes(args)
    print(f"inputs built in {time.perf_counter() - started:.1f} s: {len(mix)} requests, "
          f"{sum(len(p.request.SerializeToString()) for p in mix) / 2**20:.1f} MiB on the wire", flush=True)
    pid: list[int] = []
    with tempfile.TemporaryDirectory() as workdir, processes.gateway(
        args.model_repository, Path(workdir), env=env, started=pid.append
    ) as address:
        asyncio.run(drive(address, [Probe("warm-up", pb.AnalyzeRequest(encoded=valid_slices(1)[0]), valid=True)]))
        time.sleep(1.0)
        idle_kib = _status_kib(pid[0], "VmRSS")
        Path(f"/proc/{pid[0]}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        stop, sampled = threading.Event(), [idle_kib]
        sampler = threading.Thread(target=_sample_peak, args=(pid[0], stop, sampled), daemon=True)
        sampler.start()
        run_started = time.perf_counter()
        outcomes = asyncio.run(drive(address, mix))
        elapsed = time.perf_counter() - run_started
        stop.set()
        sampler.join()
        peak_kib = max(_status_kib(pid[0], "VmHWM"), sampled[0])
    valid = {p.kind for p in mix if p.valid}
    failures = []
    print(f"\n{'kind':<56} {'sent':>4}  statuses")
    for kind in sorted(outcomes):
        counts = outcomes[kind]
        print(f"{kind:<56} {sum(counts.values()):>4}  {dict(counts)}")
        if kind in valid and set(counts) != {"OK"}:
            failures.append(f"valid requests of '{kind}' failed: {dict(counts)}")
        if kind not in valid and ({"OK", "INTERNAL", "UNKNOWN"} & set(counts)):
            failures.append(f"hostile '{kind}' was not refused as a client error: {dict(counts)}")
    valid_sent = sum(sum(outcomes[k].values()) for k in valid)
    valid_ok = sum(outcomes[k]["OK"] for k in valid)
    print(f"\nconcurrency {CONCURRENCY}, {len(mix)} requests in {elapsed:.1f} s; settings: {env or 'defaults'}")
    print(f"gateway RSS: idle {idle_kib / 1024:.0f} MiB, peak {peak_kib / 1024:.0f} MiB "
          f"(+{(peak_kib - idle_kib) / 1024:.0f} MiB)")
    print(f"valid requests: {valid_ok}/{valid_sent} succeeded")
    if peak_kib / 1024 > args.max_peak_mb:
        failures.append(f"peak RSS {peak_kib / 1024:.0f} MiB is over {args.max_peak_mb:.0f} MiB")
    for failure in failures:
        print("FAIL:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
