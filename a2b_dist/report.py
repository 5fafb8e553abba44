"""One self-contained page per evaluation (report.html beside metrics.json) and per detection.

Everything is in the file: figures are PNGs embedded as data URIs (the same functions that write
the PNG files, a2b_dist.figures), styles are inline, there is no script and nothing is fetched, so
the page opens from a laptop after ``scp`` and shows the same numbers as metrics.json.
"""
from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any, Iterable, Optional

from a2b_dist import figures
from a2b_dist.files import write_atomic

STYLE = """
body { font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 1.5em auto; max-width: 1100px;
       color: #222; line-height: 1.4; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 1.6em;
     border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.92em; }
td, th { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.headline { display: flex; flex-wrap: wrap; gap: 0.8em; margin: 0.8em 0; }
.metric { border: 1px solid #ddd; border-radius: 6px; padding: 0.5em 0.9em; min-width: 8em; }
.metric .v { font-size: 1.6em; font-weight: 600; } .metric .k { color: #666; font-size: 0.85em; }
img { max-width: 100%; } .figs { display: flex; flex-wrap: wrap; gap: 1em; }
.flag { color: #b00; font-weight: 600; } .muted { color: #777; font-size: 0.9em; }
pre { background: #f7f7f7; padding: 0.6em; overflow-x: auto; font-size: 0.85em; }
"""


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def _table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(
        f'<td class="num">{_fmt(c)}</td>' if isinstance(c, (int, float)) and not isinstance(c, bool)
        else f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n")


def _provenance_html(prov: dict) -> str:
    """The provenance record (a2b_dist.provenance) as a table."""
    rows = [("time", prov["time"]), ("host", prov["host"]), ("command", " ".join(prov["argv"]))]
    rows += [(f"version {k}", v) for k, v in prov["versions"].items()]
    rows += [(f"manifest {name}", f"{m['path']} (sha256 {m['sha256']})") for name, m in prov["manifests"].items()]
    return _table(("what", "value"), rows)


def _panels(entries: list[tuple[str, float, dict]], label: int, empty: str, scale: Optional[dict] = None) -> str:
    if not entries:
        return f'<p class="muted">{html.escape(empty)}</p>'
    return "\n".join(_img(figures.panel_png(key, label, value, arrays, scale), key) for key, value, arrays in entries)


def write_evaluation_report(path: Path, *, metrics: dict, result: dict, config_yaml: str, prov: dict,
                            group_table: Optional[list[tuple]] = None, group_field: Optional[str] = None) -> Path:
    """report.html of ``a2b evaluate``: headline, curves, histograms, extreme cases, mask table,
    groups, the config and provenance. Its numbers are metrics.json's."""
    score, threshold = metrics["score"], metrics.get("threshold")
    scale = metrics.get("map_scale")
    c = metrics["counts"]
    cards = [("image AUROC", metrics["auroc"]), ("AUPR", metrics["aupr"]),
             ("sensitivity", metrics["sensitivity"]), ("specificity", metrics["specificity"]),
             ("pixel AUROC", metrics["pixel_auroc"]), ("AUPRO (pixel, FPR <= 0.3)", metrics.get("pixel_aupro")),
             ("threshold (Youden)", threshold)]
    headline = "".join(f'<div class="metric"><div class="v" id="{html.escape(k.split()[0])}">{_fmt(v)}</div>'
                       f'<div class="k">{html.escape(k)}</div></div>' for k, v in cards)
    parts = ["<h1>Anomaly detection report</h1>",
             f'<p class="muted">checkpoint {_fmt(metrics["checkpoint"])}, step {_fmt(metrics.get("step"))}; '
             f'shards {_fmt(metrics["shards"])} (role {_fmt(metrics.get("role"))}); score <b>{_fmt(score)}</b> '
             f'(the top-level figures); {c["samples"]} images: {c["healthy"]} healthy, {c["anomalous"]} anomalous, '
             f'{c["unlabelled"]} unlabelled; sensitivity and specificity at score &ge; threshold.</p>',
             f'<div class="headline">{headline}</div>']
    rows = [(f"score {k}", m["auroc"], m["aupr"], m["sensitivity"], m["specificity"]) for k, m in metrics["scores"].items()]
    rows += [(f"reference {k}", m["auroc"], m["aupr"], m["sensitivity"], m["specificity"])
             for k, m in metrics.get("references", {}).items()]
    parts += ["<h2>Every score and reference</h2>",
              _table(("score", "image AUROC", "AUPR", "sensitivity", "specificity"), rows),
              '<div class="figs">', _img(figures.roc_png(result, score), "ROC curves"),
              _img(figures.pr_png(result, score), "precision-recall curves"), "</div>",
              _img(figures.histogram_png(result, score, threshold), "score histograms"),
              "<p class='muted'>each panel: input | healthy translation B' | mask M | |x - B'| on the input "
              "(cyan: ground-truth outline, where the shards have one); heat maps: "
              f"{html.escape(figures.map_scale_label(scale))}, the same for every panel</p>",
              "<h2>Highest-scored healthy images (false positives first)</h2>",
              _panels(result["extremes"]["healthy_highest"], 0, "no healthy images", scale),
              "<h2>Lowest-scored anomalous images (missed first)</h2>",
              _panels(result["extremes"]["anomalous_lowest"], 1, "no anomalous images", scale),
              "<h2>Highest-scored anomalous images</h2>",
              _panels(result["extremes"]["anomalous_highest"], 1, "no anomalous images", scale)]
    mask = metrics.get("mask") or {}
    if mask:
        parts += ["<h2>Mask diagnostics</h2>", _table(("figure", "value"), sorted(mask.items()))]
    if "groups" in metrics and group_table is not None:
        g = metrics["groups"]
        parts += [f"<h2>Per {html.escape(str(g['by']))} ({g['groups']} groups)</h2>",
                  _table(("aggregate", "AUROC", "AUPR"), [("mean score", g["mean"]["auroc"], g["mean"]["aupr"]),
                                                         ("max score", g["max"]["auroc"], g["max"]["aupr"])]),
                  _table((group_field or "group", "label", "images", "mean score", "max score"), group_table)]
    if "fid" in metrics:
        parts += ["<h2>FID</h2>", _table(("figure", "value"), [(k, v) for k, v in metrics["fid"].items()])]
    parts += ["<h2>The config that trained it</h2>", f"<pre>{html.escape(config_yaml)}</pre>",
              "<h2>Provenance</h2>", _provenance_html(prov)]
    return write_atomic(path, _page("a2b evaluate report", "\n".join(parts)))


def write_detection_report(path: Path, *, rows: list[tuple[str, float]], score: str, threshold: Optional[float],
                           panels: dict[str, bytes], checkpoint: str, prov: dict) -> Path:
    """report.html of ``a2b detect``: every image once, highest score first, flagged above the
    threshold, with its panel (input | B' | mask | heat map) where one was drawn."""
    flagged = sum(v >= threshold for _, v in rows) if threshold is not None else None
    parts = ["<h1>Detection report</h1>",
             f'<p class="muted">checkpoint {_fmt(checkpoint)}; score <b>{_fmt(score)}</b>; {len(rows)} images'
             + (f"; <b>{flagged}</b> flagged at threshold {threshold:.6g}" if threshold is not None else
                "; no threshold given") + "</p>",
             _table(("rank", "image", "score", "flagged"),
                    [(i + 1, rel, value, ("yes" if value >= threshold else "no") if threshold is not None else "")
                     for i, (rel, value) in enumerate(rows)])]
    drawn = [(rel, value) for rel, value in rows if rel in panels]
    if drawn:
        parts.append(f"<h2>Heat maps ({len(drawn)} images, highest score first)</h2>")
        for rel, value in drawn:
            flag = ' <span class="flag">flagged</span>' if threshold is not None and value >= threshold else ""
            parts.append(f"<h3>{html.escape(rel)}: {value:.6g}{flag}</h3>{_img(panels[rel], rel)}")
    parts += ["<h2>Provenance</h2>", _provenance_html(prov)]
    return write_atomic(path, _page("a2b detect report", "\n".join(parts)))
