#!/usr/bin/env python
"""Do the heat maps of a real report.html show the anomalies? Each panel section of a page written
by `a2b evaluate` (highest-scored healthy images, lowest- and highest-scored anomalous ones) is put
on a page of its own with the report's style, photographed by headless Chromium, and its hot
screen pixels counted left of its colour bar: the bright end of the heat map's colour scale (orange to pale yellow, over
the grey input), not the mask's greens. On the run's scale, healthy panels should be nearly empty
and anomalous ones light up where the lesion is; the scale stated on the page is printed.

    make demo
    python benchmarks/report_heatmaps.py runs/demo/eval/report.html

Needs `chromium` (Debian: apt-get install chromium). Exits 1 when the highest-scored anomalous
panels are not at least 5 times as hot as the highest-scored healthy ones.
"""
from __future__ import annotations

import argparse
import html
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

BAR_START = 0.88   # figures.plot_panel's colour bar begins right of this share of the panel's width
SECTIONS = ("Highest-scored healthy images", "Lowest-scored anomalous images", "Highest-scored anomalous images")


def hot_pixels(png: Path) -> int:
    """Screen pixels in the bright end of the inferno colour map (as tests/test_heatmaps.py counts),
    left of the panel's colour bar: the panel is the screenshot's non-white bounding box, and its
    colour bar (whose top is always hot) starts at about 90% of its width."""
    from PIL import Image

    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    ink = np.argwhere((rgb < 245).any(axis=2))
    if not len(ink):
        return 0
    (top, left), (bottom, right) = ink.min(axis=0), ink.max(axis=0)
    rgb = rgb[top:bottom + 1, left:left + int(BAR_START * (right - left + 1))]
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return int(((r > 150) & (r - b > 35) & (r >= g - 10)).sum())


def section_images(page: str, title: str) -> list[str]:
    """The <img> tags under the <h2> that starts with ``title``, up to the next <h2>."""
    start = page.find(f"<h2>{title}")
    if start < 0:
        return []
    end = page.find("<h2>", start + 4)
    return re.findall(r"<img [^>]*>", page[start:end if end > 0 else len(page)])


def screenshot(browser: str, page: Path, png: Path) -> Path:
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--proxy-server=127.0.0.1:9", "--window-size=1200,2400", f"--screenshot={png}",
                           page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    if proc.returncode or not png.is_file():
        raise SystemExit(f"chromium failed on {page}: {proc.stderr[-1000:]}")
    return png


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report", type=Path, help="report.html written by a2b evaluate")
    args = p.parse_args(argv)
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("chromium is not installed (Debian: apt-get install chromium)")
    if not args.report.is_file():
        raise SystemExit(f"{args.report}: no such file")
    page = args.report.read_text(encoding="utf-8")
    head = page[:page.find("<body")] if "<body" in page else "<html><head></head>"
    scale = re.search(r"0 to [0-9.e+-]+ \(the [0-9.]+th percentile of this set[^)]*\)", html.unescape(page))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for title in SECTIONS:
            images = section_images(page, title)
            if not images:
                continue
            hot = 0
            for i, image in enumerate(images):    # one panel per page: its colour bar can be left out
                one = Path(tmp) / f"{len(rows)}-{i}.html"
                one.write_text(f"{head}<body>{image}</body></html>", encoding="utf-8")
                hot += hot_pixels(screenshot(browser, one, Path(tmp) / f"{len(rows)}-{i}.png"))
            rows.append((title, len(images), hot))
    if not rows:
        raise SystemExit(f"{args.report}: no panel sections found (is it a page written by a2b evaluate?)")
    print(f"{args.report}\nscale stated on the page: {scale.group(0) if scale else 'NOT FOUND'}\n")
    print("| section | panels | hot screen pixels | per panel |\n|---|---|---|---|")
    for title, n, hot in rows:
        print(f"| {title} | {n} | {hot:,} | {hot / n:,.0f} |")
    per = {title: hot / n for title, n, hot in rows}
    healthy, anomalous = per.get(SECTIONS[0]), per.get(SECTIONS[2])
    if healthy is None or anomalous is None or scale is None:
        print("\ncannot judge: the page lacks the healthy or the highest-scored anomalous panels, or the scale")
        return 1
    ok = anomalous >= 5 * max(healthy, 1.0)
    print(f"\n{'PASS' if ok else 'FAIL'}: the highest-scored anomalous panels hold {anomalous:,.0f} hot pixels "
          f"each, the highest-scored healthy ones {healthy:,.0f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
