"""A screenshot of the page after analyzing some slices (the README's picture).

    .venv/bin/python -m brainscan_web.screenshot http://127.0.0.1:8080/ IMAGE... --output docs/web-screenshot.png

Needs a running `brainscan web` and Debian's chromium (`make system-deps`), driven
through Playwright exactly as tests/test_web.py drives it. Not imported by the page.
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
# Headless, and nothing that phones home: the page must work with no network but its own origin.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]


def launch(playwright: Any, profile_dir: str | Path, **options: Any) -> Any:
    """Debian's chromium in a fresh profile (never `playwright install`'s browsers)."""
    return playwright.chromium.launch_persistent_context(
        str(profile_dir), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS, **options
    )


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Screenshot of `brainscan web` after analyzing IMAGES.")
    parser.add_argument("url", help="the page, e.g. http://127.0.0.1:8080/")
    parser.add_argument("images", nargs="+", type=Path, help="slices to drop on the page")
    parser.add_argument("--output", type=Path, required=True, help="PNG to write")
    parser.add_argument("--width", type=int, default=1280, help="viewport width in px (default 1280)")
    parser.add_argument("--height", type=int, default=900, help="viewport height in px (default 900)")
    parser.add_argument("--scale", type=float, default=0.75, help="resize the picture by this factor (default 0.75)")
    parser.add_argument("--colors", type=int, default=256, help="palette size; with --scale keeps the PNG small (default 256)")
    return parser


def main(args: argparse.Namespace) -> int:
    from PIL import Image
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright, tempfile.TemporaryDirectory() as profile:
        context = launch(playwright, profile, viewport={"width": args.width, "height": args.height})
        page = context.new_page()
        page.goto(args.url)
        page.wait_for_selector("#gateway-status:not(:has-text('Checking'))")
        page.set_input_files("#file-input", [str(path) for path in args.images])
        page.wait_for_selector("#progress:has-text('Done')", timeout=120_000)
        png = page.screenshot()
        context.close()
    image = Image.open(io.BytesIO(png)).convert("RGB")
    size = (round(image.width * args.scale), round(image.height * args.scale))
    image = image.resize(size, Image.Resampling.LANCZOS).quantize(colors=args.colors)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.output, optimize=True)
    print(f"{args.output}: {args.output.stat().st_size // 1024} KB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
