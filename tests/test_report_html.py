"""The files of ``lowbit compare`` and its HTML report: every file written, a rerun reusing both
checkpoints, a self-contained HTML (no external URL) whose plots are valid PNGs, and the report
rendered by a real headless Chromium (Debian's ``chromium``; ``scripts/test.sh`` installs it) into a
screenshot that is not blank, with every plot in its DOM."""

from __future__ import annotations

import base64
import json
import re
import shutil
import struct
import subprocess
import zlib
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from world import CALIB_ARGS, EVAL_ARGS, World, build_world, run_cli

from lowbit.lab.plots import draw_all
from lowbit.lab.report_html import render

PRESETS = "w4a16-rtn,w6a16-fp6"  # data-free: quick to make
PLOTS = ("quality", "layers", "quantize_time")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class Report:
    world: World
    out: Path
    first: dict[str, Any]
    second: dict[str, Any]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Report:
    world = build_world(tmp_path_factory.mktemp("report"))
    out = world.root / "cmp"
    argv = ["compare", str(world.model), "--presets", PRESETS, "--calib", str(world.text), "--out", str(out)]
    docs = []
    for _ in range(2):
        rc, _, err = run_cli([*argv, *CALIB_ARGS, *EVAL_ARGS, "--quiet"])
        assert rc == 0, err
        docs.append(json.loads((out / "results.json").read_text()))
    return Report(world, out, docs[0], docs[1])


def test_every_file_is_written(report: Report) -> None:
    names = ["results.json", "results.csv", "results.md", "report.html", *(f"plots/{p}.png" for p in PLOTS)]
    for name in names:
        assert (report.out / name).is_file() and (report.out / name).stat().st_size > 0, name
    for preset in PRESETS.split(","):
        assert (report.out / "checkpoints" / preset / "lowbit.json").is_file()
    leftovers = [p.name for p in report.out.rglob("*") if p.name.endswith((".tmp", ".lowbit-tmp", ".partial"))]
    assert leftovers == []


def test_a_rerun_reuses_both_checkpoints(report: Report) -> None:
    assert [(j["name"], j["quantize"]) for j in report.first["jobs"]] == [(p, "quantized") for p in PRESETS.split(",")]
    assert [(j["name"], j["quantize"], j["evaluate"]) for j in report.second["jobs"]] == [
        (p, "reused", "reused") for p in PRESETS.split(",")
    ]


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's signature and IHDR chunk, with the chunk's CRC checked."""
    assert data[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    body = data[16 : 16 + length]
    (crc,) = struct.unpack(">I", data[16 + length : 20 + length])
    assert crc == zlib.crc32(kind + body)
    width, height = struct.unpack(">II", body[:8])
    return width, height


def pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.float64)


def test_plots_are_valid_pngs_without_metadata(report: Report) -> None:
    for name in PLOTS:
        path = report.out / "plots" / f"{name}.png"
        data = path.read_bytes()
        width, height = png_size(data)
        assert width > 200 and height > 200
        rgb = pixels(path)
        assert rgb.shape == (height, width, 3)
        assert rgb.std() > 5  # drawn, not one colour
        assert b"tEXt" not in data and b"http" not in data


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: dict[str, str] = {}
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.images[a.get("id") or ""] = a.get("src") or ""
        self.refs += [v for k, v in attrs if k in ("src", "href", "action", "srcset", "poster") and v]


def _parse(text: str) -> _Images:
    parser = _Images()
    parser.feed(text)
    return parser


def test_html_is_self_contained_and_embeds_the_plots(report: Report) -> None:
    text = (report.out / "report.html").read_text()
    assert not re.search(r"(?i)(https?|ftp|file)://", text)
    assert not re.search(r"(?i)<(script|link|iframe|object|embed)\b|url\(|@import", text)
    parsed = _parse(text)
    assert sorted(parsed.images) == sorted(f"plot-{p}" for p in PLOTS)
    assert all(ref.startswith("data:image/png;base64,") for ref in parsed.refs)
    for name in PLOTS:
        embedded = base64.b64decode(parsed.images[f"plot-{name}"].split(",", 1)[1])
        assert embedded == (report.out / "plots" / f"{name}.png").read_bytes()
    for preset in PRESETS.split(","):
        assert f"<h3>{preset}</h3>" in text  # the recipes
    assert "transformers" in text and report.first["host"]["hostname"] in text  # versions, machine


def test_decode_speed_plot_when_timed(report: Report) -> None:
    doc = json.loads(json.dumps(report.first))
    doc["timings"]["speed"] = True
    for i, row in enumerate(doc["timings"]["rows"].values()):
        row.update(fp32_tok_s=10.0, kernels_tok_s=20.0 + i, kernels_x_fp32=2.0)
    plots = draw_all(doc)
    assert list(plots) == [*PLOTS, "decode_speed"]
    assert png_size(plots["decode_speed"])[0] > 200
    html = render(doc, plots)
    assert 'id="plot-decode_speed"' in html and "decode tok/s" in html


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(html: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={tmp / 'profile'}", *args, html.resolve().as_uri()]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium: scripts/test.sh installs Debian's chromium (apt-get)")
def test_headless_chromium_renders_the_report(report: Report, tmp_path: Path) -> None:
    html = report.out / "report.html"
    shot = tmp_path / "shot.png"
    done = _chromium(html, tmp_path, f"--screenshot={shot}", "--window-size=1200,2400")
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    width, height = png_size(shot.read_bytes())
    assert (width, height) == (1200, 2400)
    rgb = pixels(shot)
    assert rgb.std() > 10  # text, tables and plots on a white page, not a blank page
    assert (rgb.min(axis=2) < 128).mean() > 0.005  # some dark pixels: drawn content
    dom = _chromium(html, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    parsed = _parse(dom.stdout)
    assert sorted(parsed.images) == sorted(f"plot-{p}" for p in PLOTS)
    assert all(src.startswith("data:image/png;base64,") for src in parsed.images.values())
