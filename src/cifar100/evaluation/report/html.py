"""The evaluation report as one self-contained HTML page (its Markdown twin:
``cifar100.evaluation.report.markdown``).

The HTML embeds its figures as base64 PNG and its style inline: no scripts, fonts or
links to fetch, so it opens offline and can be mailed or attached as one file.
"""

from __future__ import annotations

import base64
import html
from typing import Any

from cifar100.evaluation.report.markdown import pct, scaling_note
from cifar100.evaluation.report.plots import FIGURES

STYLE = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2937;
 background:#f8fafc;margin:0}
main{max-width:1180px;margin:0 auto;padding:28px 32px 64px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:20px;margin:40px 0 8px;
 border-bottom:1px solid #e5e7eb;padding-bottom:4px}
.meta{color:#6b7280;font-size:13px}.meta code{font-size:12px}
nav{margin:14px 0 0;font-size:13px}nav a{color:#2563eb;margin-right:14px;text-decoration:none}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:22px 0 4px}
.card{background:#fff;border:1px solid #e5e7eb;border-radius:10px;padding:12px 18px;
 min-width:130px}
.card b{display:block;font-size:26px;color:#111827}.card span{color:#6b7280;font-size:13px}
figure{margin:12px 0;background:#fff;border:1px solid #e5e7eb;border-radius:10px;padding:12px}
figure img{max-width:100%;height:auto;display:block;margin:0 auto}
figcaption{color:#6b7280;font-size:13px;margin-top:6px}
table{border-collapse:collapse;background:#fff;font-size:13px;margin:8px 0}
th,td{padding:4px 10px;border-bottom:1px solid #eef0f3;text-align:right}
th{background:#f1f5f9;position:sticky;top:0}td:first-child,th:first-child{text-align:left}
td.name{text-align:left}tr.avg td{font-weight:600;background:#f8fafc}
.bar{display:inline-block;height:8px;background:#2563eb;border-radius:2px;
 vertical-align:middle;margin-left:6px}
.cols{display:flex;flex-wrap:wrap;gap:32px;align-items:flex-start}
h3{font-size:15px;margin:8px 0 4px}
.muted{color:#6b7280}
"""


def _img(stem: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img id="{stem}-img" alt="{FIGURES[stem][0]}" src="data:image/png;base64,{data}">'


def _cards(report: dict[str, Any]) -> str:
    cards = [
        ("Top-1 accuracy", pct(report["top1"])),
        ("Top-5 accuracy", pct(report["top5"])),
        ("Superclass accuracy", pct(report["superclass_accuracy"])),
        ("Macro F1", f"{report['macro_f1']:.3f}"),
        ("ECE (15 bins)", pct(report["ece"])),
        ("Test loss (NLL)", f"{report['nll']:.3f}"),
    ]
    if "temperature_scaling" in report:
        cards.append(("ECE, temperature-scaled", pct(report["temperature_scaling"]["ece_after"])))
    return (
        '<div class="cards">'
        + "".join(f"<div class=card><b>{v}</b><span>{k}</span></div>" for k, v in cards)
        + "</div>"
    )


def _report_table(table_id: str, report: dict[str, Any], groups: list[str] | None) -> str:
    """A classification report as an HTML table (F1 drawn as a bar too)."""
    head = ["class"] + (["superclass"] if groups else []) + ["precision", "recall", "F1", "support"]
    rows = []
    for i, row in enumerate(report["classes"]):
        group = f"<td class=name>{html.escape(groups[i])}</td>" if groups else ""
        bar = f'<span class=bar style="width:{60 * row["f1"]:.0f}px"></span>'
        rows.append(
            f"<tr><td>{html.escape(row['name'])}</td>{group}"
            f"<td>{row['precision']:.3f}</td><td>{row['recall']:.3f}</td>"
            f"<td>{row['f1']:.3f}{bar}</td><td>{row['support']}</td></tr>"
        )
    pad = "<td></td>" if groups else ""
    total = report["macro_avg"]["support"]
    rows.append(
        f"<tr class=avg><td>accuracy</td>{pad}<td></td><td></td>"
        f"<td>{report['accuracy']:.3f}</td><td>{total}</td></tr>"
    )
    for key, label in (("macro_avg", "macro avg"), ("weighted_avg", "weighted avg")):
        avg = report[key]
        rows.append(
            f"<tr class=avg><td>{label}</td>{pad}<td>{avg['precision']:.3f}</td>"
            f"<td>{avg['recall']:.3f}</td><td>{avg['f1']:.3f}</td>"
            f"<td>{avg['support']}</td></tr>"
        )
    header = "".join(f"<th>{h}</th>" for h in head)
    return (
        f'<table id="{table_id}"><thead><tr>{header}</tr></thead><tbody>'
        + "".join(rows)
        + "</tbody></table>"
    )


def _pairs_table(pairs: list[dict[str, Any]]) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(p['true'])}</td><td class=name>{html.escape(p['predicted'])}</td>"
        f"<td>{p['count']}</td><td>{pct(p['share'])}</td></tr>"
        for p in pairs
    )
    return (
        '<table id="confused-pairs"><thead><tr><th>true class</th><th>predicted as</th>'
        f"<th>images</th><th>share of true class</th></tr></thead><tbody>{rows}"
        "</tbody></table>"
    )


def _meta_line(report: dict[str, Any]) -> str:
    runs = ", ".join(f"<code>{html.escape(r)}</code>" for r in report["runs"])
    kind = f"ensemble of {len(report['runs'])} runs" if len(report["runs"]) > 1 else "run"
    models = ", ".join(sorted(set(report["models"])))
    tta = "with flip test-time augmentation" if report["tta_flip"] else "no test-time augmentation"
    return (
        f"<p class=meta>{kind} {runs} · model {html.escape(models)} · "
        f"{report['images']:,} test images from <code>{html.escape(report['data'])}</code>"
        f" · {tta}<br>made {html.escape(report['created'])} at commit "
        f"<code>{html.escape(str(report.get('commit')))}</code></p>"
    )


def _figure(stem: str, images: dict[str, bytes], heading: bool = True) -> str:
    if stem not in images:
        return ""
    title, caption = FIGURES[stem]
    head = f'<h2 id="{stem}">{title}</h2>' if heading else ""
    return f"{head}<figure>{_img(stem, images[stem])}<figcaption>{caption}</figcaption></figure>"


def render_html(report: dict[str, Any], images: dict[str, bytes]) -> str:
    """The whole page; ``images`` maps figure stems (see FIGURES) to PNG bytes."""
    groups = [report["superclass_names"][c] for c in report["fine_to_coarse"]]
    sections = [
        ("summary", "Summary"),
        ("confusion", "Confusion"),
        ("superclasses", "Superclasses"),
        ("pairs", "Most confused"),
        ("misclassified", "Mistakes"),
        ("reliability", "Calibration"),
        ("curves", "Training"),
        ("per-class", "Per class"),
    ]
    nav = "<nav>" + "".join(f'<a href="#{a}">{t}</a>' for a, t in sections) + "</nav>"
    body = [
        f"<h1 id=summary>CIFAR-100 evaluation: {html.escape(report['title'])}</h1>",
        _meta_line(report),
        nav,
        _cards(report),
        _figure("confusion", images),
        '<h2 id="superclasses">Superclasses and confused pairs</h2><p class=muted>A fine '
        "prediction counts as right when it lands in the true superclass: accuracy "
        f"{pct(report['superclass_accuracy'])}.</p><div class=cols><div><h3>Superclass "
        f"report</h3>{_report_table('superclass-report', report['superclass_report'], None)}"
        '</div><div id="pairs"><h3>Most confused pairs (fine classes)</h3>'
        f"{_pairs_table(report['most_confused'])}</div></div>",
        _figure("superclass_confusion", images, heading=False),
        _figure("misclassified", images),
        _figure("reliability", images),
        f"<p class=muted>{html.escape(scaling_note(report))}</p>"
        if "temperature_scaling" in report
        else "",
        _figure("curves", images),
        '<h2 id="per-class">Per-class report</h2>'
        + _report_table("class-report", report["classification_report"], groups),
    ]
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        f"<title>CIFAR-100 evaluation: {html.escape(report['title'])}</title>"
        f"<style>{STYLE}</style></head><body><main>" + "\n".join(body) + "</main></body></html>\n"
    )
