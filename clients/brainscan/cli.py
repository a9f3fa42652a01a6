"""`brainscan`: the SDK's command line: analyze files against a running gateway, show its models, a web page.

Serving is `brainscan-server` (gateway/cli.py); training, export and evaluation
`python -m export`; benchmarks `python -m bench`.

Research use only. Not a medical device; not for diagnosis or treatment decisions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from brainscan.results import DISCLAIMER

DEFAULT_MAX_REQUEST_MB = 32.0  # the gateway's default max_request_mb


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="brainscan",
        description=f"Brain-MRI tumor analysis over gRPC. {DISCLAIMER}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="The gateway itself: brainscan-server --help.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    analyze = commands.add_parser("analyze", help="analyze image files against a running gateway")
    analyze.add_argument("images", nargs="+", type=Path, help="PNG, JPEG or DICOM files, or folders of DICOM series")
    analyze.add_argument("--json", action="store_true", help="print one JSON object per line")
    analyze.add_argument("--overlay", type=Path, metavar="DIR", help="write an overlay PNG per image into DIR")
    analyze.add_argument("--no-segment", action="store_true", help="skip the U-Net")
    analyze.add_argument("--no-detect", action="store_true", help="skip the Mask R-CNN")
    analyze.add_argument("--ungated", action="store_true", help="run U-Net/Mask R-CNN even when no tumor is seen")
    analyze.add_argument("--timeout", type=float, default=30.0, help="per-image deadline in seconds (default 30)")
    analyze.add_argument("--dicom-seg", type=Path, metavar="OUT_DIR",
                         help="analyze as DICOM series and write one DICOM SEG per series into OUT_DIR")
    analyze.add_argument("--dicom-sr", action="store_true",
                         help="with --dicom-seg: also a DICOM SR (TID 1500) with the volume and largest cross-section")
    analyze.add_argument("--group-series", action="store_true",
                         help="the DICOM files may hold several series: one result per series")
    add_connection_flags(analyze)

    info = commands.add_parser("info", help="show the models a gateway serves")
    add_connection_flags(info)

    web = commands.add_parser(
        "web", help="a web page for analyzing slices against a running gateway",
        description=f"Serve a local web page that sends dropped slices to a gateway. {DISCLAIMER}",
    )
    web.add_argument("--host", default="127.0.0.1", help="address the page binds (default 127.0.0.1; the page has no login)")
    web.add_argument("--port", type=int, default=8080, help="port the page binds (default 8080; 0 picks a free one)")
    web.add_argument(
        "--max-upload-mb", type=float,
        help="largest file the page accepts (default: the gateway's BRAINSCAN_MAX_REQUEST_MB, else 32)",
    )
    web.add_argument("--timeout", type=float, default=30.0, help="per-slice deadline in seconds (default 30)")
    add_connection_flags(web)

    return parser


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    """--server and the TLS / token flags of every command that calls a gateway."""
    parser.add_argument("--server", default="127.0.0.1:50051", help="gateway address (default 127.0.0.1:50051)")
    parser.add_argument("--tls-ca", type=Path, help="PEM CA bundle to verify the gateway's certificate (enables TLS)")
    parser.add_argument("--tls-cert", type=Path, help="PEM client certificate for mutual TLS")
    parser.add_argument("--tls-key", type=Path, help="PEM client key for mutual TLS")
    parser.add_argument(
        "--token-file", type=Path, help="file holding the bearer token (or set BRAINSCAN_TOKEN)"
    )


def connect(args: argparse.Namespace, **kwargs: object):
    """A blocking Client from the flags of add_connection_flags."""
    import os

    from brainscan.client import Client

    if args.token_file and not args.token_file.is_file():
        raise SystemExit(f"brainscan: token file {args.token_file} not found")
    token = args.token_file.read_text().strip() if args.token_file else os.environ.get("BRAINSCAN_TOKEN")
    return Client(
        args.server, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key, token=token, **kwargs
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "analyze":
        return _analyze(args)
    if args.command == "info":
        return _info(args)
    if args.command == "web":
        return _web(args)
    build_parser().print_help()
    return 2


def _analyze(args: argparse.Namespace) -> int:
    from brainscan.errors import BrainscanError, ServerUnavailable, Unauthenticated

    if args.dicom_seg or any(path.is_dir() for path in args.images):
        return _analyze_series(args)
    failures = 0
    overlay_names: set[str] = set()
    with connect(args, timeout_s=args.timeout) as client:
        for path in args.images:
            try:
                result = client.analyze(
                    path, segment=not args.no_segment, detect=not args.no_detect, gate=not args.ungated
                )
            except (ServerUnavailable, Unauthenticated) as error:  # every other file would fail the same way
                print(f"brainscan analyze: {error}", file=sys.stderr)
                return 1
            except BrainscanError as error:  # this file only: report it and go on
                failures += 1
                print(f"{path}: {error}", file=sys.stderr)
                continue
            if args.json:
                print(json.dumps(result.to_json_dict()), flush=True)
            else:
                print(format_table(result), flush=True)
            if args.overlay:
                from brainscan.overlay import write_overlay

                target = write_overlay(path, result, args.overlay, name=_unique_stem(path, overlay_names))
                if not args.json:
                    print(f"  overlay: {target}")
    return 1 if failures else 0


def _analyze_series(args: argparse.Namespace) -> int:
    """Folders (or files) of DICOM series through AnalyzeSeries: a summary per series, SEGs on request."""
    from brainscan.errors import BrainscanError

    try:
        with connect(args, timeout_s=args.timeout) as client:
            analysis = client.analyze_series(
                args.images, segment=not args.no_segment, detect=not args.no_detect, gate=not args.ungated,
                group_series=args.group_series, dicom_seg=args.dicom_seg is not None,
                dicom_sr=args.dicom_sr and args.dicom_seg is not None,
            )
    except BrainscanError as error:
        print(f"brainscan analyze: {error}", file=sys.stderr)
        return 1
    for skipped in analysis.skipped:
        print(f"{skipped.file}: skipped: {skipped.reason}", file=sys.stderr)
    for failure in analysis.failed:
        print(f"series {failure.series_instance_uid}: {failure.error}", file=sys.stderr)
    for series in analysis.series:
        target = None
        if args.dicom_seg is not None and series.dicom_seg:
            args.dicom_seg.mkdir(parents=True, exist_ok=True)
            target = args.dicom_seg / f"{series.series_instance_uid}.seg.dcm"
            target.write_bytes(series.dicom_seg)
            if series.dicom_sr:
                (args.dicom_seg / f"{series.series_instance_uid}.sr.dcm").write_bytes(series.dicom_sr)
        if args.json:
            print(json.dumps({**series.to_json_dict(), "dicom_seg": None if target is None else str(target)}), flush=True)
        else:
            print(format_series(series, target), flush=True)
    return 1 if analysis.failed else 0


def format_series(series, seg_path: Path | None = None) -> str:
    distance = f", {series.slice_distance_mm:g} mm apart" if series.slice_distance_mm else ""
    lines = [
        f"series {series.series_instance_uid}",
        f"  label: {series.label}   {len(series.slices)} slices (ordered by {series.ordered_by.replace('_', ' ')}{distance})",
    ]
    tumor = ", ".join(map(str, series.tumor_slices)) or "none"
    largest = "unknown" if series.largest_cross_section_mm2 is None else f"{series.largest_cross_section_mm2:.1f} mm²"
    volume = "unknown" if series.volume_ml is None else f"{series.volume_ml:.3f} mL"
    lines.append(f"  tumor on slices: {tumor}   largest cross-section: {largest}   volume: {volume}")
    lines.extend(f"  note: {note}" for note in series.notes)
    for index, item in enumerate(series.slices):
        result = item.result
        where = "" if item.position_mm is None else f" at {item.position_mm:.1f} mm"
        area = f"   mask {result.segmentation_area_mm2:.1f} mm²" if result.segmentation_area_mm2 is not None else ""
        frame = f" frame {item.frame}" if item.frame else ""
        lines.append(f"  {index:>3} {item.file}{frame}{where}: {result.label}   p(tumor) = {result.tumor_probability:.3f}{area}")
    models = ", ".join(f"{k} v{v}" for k, v in sorted(series.models.items()))
    lines.append(f"  models: {models}")
    if seg_path is not None:
        lines.append(f"  DICOM SEG: {seg_path}")
    return "\n".join(lines)


def _unique_stem(path: Path, taken: set[str]) -> str:
    """The file's stem, or stem-2, stem-3, … when an earlier file of this run had the same one
    (datasets reuse names such as image(1).jpg in every class folder)."""
    stem, number = path.stem, 1
    while stem in taken:
        number += 1
        stem = f"{path.stem}-{number}"
    taken.add(stem)
    return stem


def _info(args: argparse.Namespace) -> int:
    from brainscan.errors import BrainscanError

    try:
        with connect(args) as client:
            info = client.model_info()
    except BrainscanError as error:
        print(f"brainscan info: {error}", file=sys.stderr)
        return 1
    print(f"backend: {info.backend}")
    for model in info.models:
        labels = f"  labels: {', '.join(model.labels)}" if model.labels else ""
        print(f"  {model.role:<10} {model.name} v{model.version}  input {model.input_size}px{labels}")
    d = info.decision
    print(f"decision: tumor when p(tumor) >= {d.strong:g}, or >= {d.gate:g} with a U-Net mask >= {d.min_mask_fraction:g} "
          f"of its input or a Mask R-CNN instance >= {info.detection_threshold:g}; >= {d.alone:g} when both are skipped")
    print(f"U-Net mask: pixels >= {info.mask_threshold:g}, regions under {info.unet_min_component_px} px of its "
          "input grid dropped")
    learned = f"classifier in_scope >= {d.scope_threshold:g}" if d.learned_scope_check else "not available (model has no in_scope output)"
    print(f"scope: image-level checks (blank, colour image); learned check: {learned}")
    print(info.disclaimer)
    return 0


def _web(args: argparse.Namespace) -> int:
    import os

    try:
        from brainscan_web.app import create_app
        from brainscan_web.server import bind, run
    except ImportError as error:  # fastapi/uvicorn: the SDK's optional [web] extra
        print(f"brainscan web: {error}; install it with pip install 'brainscan-client[web]'", file=sys.stderr)
        return 1

    # The gateway refuses requests over BRAINSCAN_MAX_REQUEST_MB; the page stops bigger files before sending them.
    max_mb = args.max_upload_mb or float(os.environ.get("BRAINSCAN_MAX_REQUEST_MB", DEFAULT_MAX_REQUEST_MB))
    try:
        sock = bind(args.host, args.port)
    except OSError as error:
        print(f"brainscan web: cannot bind {args.host}:{args.port}: {error}", file=sys.stderr)
        return 1
    host, port = sock.getsockname()[:2]
    with connect(args, timeout_s=args.timeout) as client:
        app = create_app(client, server=args.server, max_upload_bytes=int(max_mb * 1024 * 1024), timeout_s=args.timeout)
        print(DISCLAIMER, file=sys.stderr)
        print(f"brainscan web: page on http://{host}:{port}/ (gateway {args.server})", file=sys.stderr, flush=True)
        run(app, sock)
    return 0


def format_table(result) -> str:
    lines = [f"{result.image_id}", f"  label: {result.label}   p(tumor) = {result.tumor_probability:.3f}"]
    if not result.scope.assessed:
        lines.append(f"  not assessed ({result.scope.reason}): {result.scope.detail}")
    probabilities = "  ".join(f"{k}={v:.3f}" for k, v in sorted(result.probabilities.items()))
    lines.append(f"  probabilities: {probabilities}")
    if result.mask is not None:
        mm2 = f" ({result.segmentation_area_mm2:.1f} mm²)" if result.segmentation_area_mm2 is not None else ""
        box = ", ".join(f"{v:.0f}" for v in result.segmentation_bbox)
        lines.append(f"  segmentation: {result.segmentation_area_px} px{mm2}, bbox [{box}]")
    else:  # not run: the gate saw no tumor, or --no-segment
        lines.append("  segmentation: empty" if result.segmentation_ran else "  segmentation: not run")
    for index, inst in enumerate(result.instances, 1):
        box = ", ".join(f"{v:.0f}" for v in inst.box)
        lines.append(f"  instance {index}: score {inst.score:.3f}  box [{box}]  area {inst.area_px} px")
    if not result.instances:
        lines.append("  instances: none" if result.detection_ran else "  instances: not run")
    models = ", ".join(f"{k} v{v}" for k, v in sorted(result.models.items()))
    total = result.timings.get("total")
    lines.append(f"  models: {models}" + (f"   time: {total:.1f} ms" if total is not None else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
