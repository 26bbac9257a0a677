"""``report.html``: the report to browse, offline (no CDN, no network, no external script).

One page: the report's sections (the same Markdown as ``report.md``, rendered with
``markdown-it-py``), a sortable patient table (plain inline JavaScript; click a header), and
per patient a gallery of its cells ordered by the chosen model's out-of-fold cell score or
attention weight (highest first), under the prediction. Gallery images go to
``assets/cells/<id>.jpg`` (one sheet per patient, at most :data:`GALLERY_CELLS` cells); the
figures are the report folder's PNGs, linked relatively, so the folder can be moved whole.
"""

from __future__ import annotations

import html as _h
import re
from pathlib import Path
from typing import Any

import numpy as np

from lymph.atomic import atomic_path, write_text_atomic

#: the triage decision in words (1: predicted malignant, so sent to cytometry)
_TRIAGE = {1: "cytometry", 0: "no cytometry"}
GALLERY_CELLS = 40
GALLERY_COLS = 10
TILE = 96

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d2430;background:#fafbfc}
header{background:#24364b;color:#fff;padding:10px 24px}header h1{margin:0;font-size:22px}
nav{position:sticky;top:0;background:#e9eef4;padding:6px 24px;border-bottom:1px solid #c9d3de;z-index:2}
nav a{margin-right:14px;color:#24364b;text-decoration:none;font-size:14px}
main{max-width:1200px;padding:8px 24px 40px}
h2{border-bottom:2px solid #24364b;padding-bottom:3px;margin-top:34px}
table{border-collapse:collapse;margin:8px 0;font-size:13px;background:#fff}
th,td{border:1px solid #cfd6de;padding:3px 8px;text-align:left}
th{background:#eef2f6}
img{max-width:100%;height:auto}
.summary{background:#fff;border-left:5px solid #2b7bb9;padding:6px 16px;margin:12px 0}
#patients th{cursor:pointer;user-select:none}#patients th:hover{background:#dbe5ef}
#patients th.asc::after{content:" \\25B2"}#patients th.desc::after{content:" \\25BC"}
tr.wrong td{background:#fdecea}
.gallery section{background:#fff;border:1px solid #d5dce4;margin:10px 0;padding:6px 12px}
.gallery h3{margin:4px 0;font-size:16px}
.muted{color:#5b6675;font-size:13px}
"""

_JS = """
document.addEventListener('DOMContentLoaded', function () {
  var table = document.getElementById('patients');
  if (!table) { return; }
  var heads = table.tHead.rows[0].cells;
  for (var c = 0; c < heads.length; c++) {
    (function (col) {
      heads[col].addEventListener('click', function () {
        var th = heads[col];
        var asc = !th.classList.contains('asc');
        for (var k = 0; k < heads.length; k++) { heads[k].classList.remove('asc', 'desc'); }
        th.classList.add(asc ? 'asc' : 'desc');
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = a.cells[col].getAttribute('data-v'), y = b.cells[col].getAttribute('data-v');
          var nx = parseFloat(x), ny = parseFloat(y);
          var cmp = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : String(x).localeCompare(String(y));
          if (x === '' && y !== '') { return 1; }
          if (y === '' && x !== '') { return -1; }
          return asc ? cmp : -cmp;
        });
        for (var i = 0; i < rows.length; i++) { body.appendChild(rows[i]); }
      });
    })(c);
  }
});
"""


def _safe(pid: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", pid)


def _md(text: str) -> str:
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table").render(text)


def _cell(v: Any, shown: str | None = None) -> str:
    data = "" if v is None else str(v)
    return f'<td data-v="{_h.escape(data)}">{_h.escape(shown if shown is not None else data)}</td>'


def _label(v: int | None) -> str:
    return {1: "malignant", 0: "reactive", -1: "unknown"}.get(v, "–") if v is not None else "–"


def patient_table(rows: list[dict[str, Any]], target: float) -> str:
    pct = round(100 * target)
    head = ["id", "label", "P(malignant)", "source", f"triage at {pct}% sensitivity",
            "prediction at balanced threshold", "triage correct", "lymph count x10^9/L", "age", "cells"]
    out = ['<table id="patients"><thead><tr>' + "".join(f"<th>{_h.escape(h)}</th>" for h in head)
           + "</tr></thead><tbody>"]
    for r in rows:
        p = r["probability"]
        cls = ' class="wrong"' if r["correct"] == 0 else ""
        out.append(
            f"<tr{cls}>"
            f'<td data-v="{_h.escape(r["id"])}"><a href="#p-{_safe(r["id"])}">{_h.escape(r["id"])}</a></td>'
            + _cell(r["label"], _label(r["label"]))
            + _cell(None if p is None else f"{p:.4f}", "–" if p is None else f"{p:.3f}")
            + _cell(r["source"], r["source"] or "not scored")
            + _cell(r["triage"], _TRIAGE.get(r["triage"], "–"))
            + _cell(r["balanced"], "–" if r["balanced"] is None else _label(r["balanced"]))
            + _cell(r["correct"], {1: "yes", 0: "no"}.get(r["correct"], "–"))
            + _cell(r["lymph_count"], "–" if r["lymph_count"] is None else f"{r['lymph_count']:.1f}")
            + _cell(r["age"], "–" if r["age"] is None else f"{r['age']:.0f}")
            + _cell(r["cells"]) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _gallery_image(store: Any, row: int, weights: np.ndarray | None, source: Any,
                   wname: str, path: Path) -> tuple[int, tuple[int, int]]:
    """One sheet of the patient's cells, highest weight first; returns the cells shown and
    the image size (written into the page, so that the layout does not move as it loads)."""
    from lymph.report.montage import montage_image

    cells = source.read_bag(row)
    n = len(cells)
    order = np.arange(n) if weights is None else np.argsort(-np.asarray(weights), kind="stable")
    order = order[:GALLERY_CELLS]
    caps = [f"#{j}" if weights is None else f"#{j}: {weights[j]:.3g}" for j in order]
    img = montage_image([cells[j] for j in order], caps, [], ncols=GALLERY_COLS, tile=TILE)
    with atomic_path(path) as tmp:
        img.convert("RGB").save(tmp, format="JPEG", quality=85)
    return len(order), img.size


def galleries(out: Path, a: dict[str, Any], store: Any, result: Any, cache: Any,
              predictions: dict[str, Any] | None, pixels: bool = True) -> tuple[str, list[Path]]:
    """Per patient: a heading, the decision, and (with ``pixels``) the sheet of its cells."""
    from lymph.errors import LymphError
    from lymph.report.montage import cell_weights
    from lymph.report.montage import PixelSource

    m = result.models[a["chosen"]]
    oof_w, wname = cell_weights(m)
    final_w = (predictions or {}).get("weights", {})
    what = "cell score" if wname == "score" else "attention weight"
    source = PixelSource(store, cache)
    parts, paths = [], []
    no_pixels = False
    for i, r in enumerate(a["patients"]):
        pid = r["id"]
        w = oof_w.get(pid)
        origin = f"{what} from the fold model that did not see this patient"
        if w is None and pid in final_w:
            w, origin = final_w[pid], f"{what} from the final model (trained on the labelled patients)"
        if w is None:
            origin = "store order (no model scored this patient)"
        p = r["probability"]
        decision = "not scored" if p is None else (
            f"P(malignant) {p:.3f} ({r['source']}); triage: {_TRIAGE.get(r['triage'], '–')}; "
            f"prediction at the balanced threshold: {_label(r['balanced'])}")
        path = out / "assets" / "cells" / f"{_safe(pid)}.jpg"
        if not pixels:
            img, note = "", "cell images not requested (--no-montages)"
        elif no_pixels:  # the store has no pixels for any patient: said once, at the first
            img, note = "", "no cell images (see the first patient)"
        else:
            try:
                shown, (wd, ht) = _gallery_image(store, i, w, source, wname, path)
                img = (f'<img loading="lazy" src="assets/cells/{_safe(pid)}.jpg" width="{wd}" '
                       f'height="{ht}" alt="cells of {_h.escape(pid)}">')
                paths.append(path)
                note = (f"{shown} of {r['cells']} cells, ordered by {origin}, highest first "
                        f"(caption: cell index in the patient's folder order: "
                        f"{'score' if wname == 'score' else 'weight'}).")
            except LymphError as e:
                img, note = "", f"no cell images: {e}"
                no_pixels = store.image_paths is None and cache is None
        parts.append(f'<section id="p-{_safe(pid)}"><h3>{_h.escape(pid)}: '
                     f'{_h.escape(_label(r["label"]))}</h3><p>{_h.escape(decision)}</p>'
                     f'<p class="muted">{_h.escape(note)}</p>{img}</section>')
    return "\n".join(parts), paths


def write_html(out: Path, a: dict[str, Any], intro: str, sections: list[tuple[str, str]],
               store: Any, result: Any, *, cache: Any = None,
               predictions: dict[str, Any] | None = None, pixels: bool = True) -> dict[str, Path]:
    """Write ``report.html`` and ``assets/``; returns ``{"html": path}``."""
    gal, _ = galleries(out, a, store, result, cache, predictions, pixels)
    ids = {t: "s-" + re.sub(r"[^a-z0-9]+", "-", t.lower()).strip("-") for t, _ in sections}
    # the clinical sections, the patient table, the model comparison; the (long) cell
    # galleries last, so that every other section is reached without scrolling past them
    nav = "".join(f'<a href="#{ids[t]}">{_h.escape(t)}</a>' for t, _ in sections[:7])
    nav += '<a href="#s-patients">Patients</a>'
    nav += "".join(f'<a href="#{ids[t]}">{_h.escape(t)}</a>' for t, _ in sections[7:])
    nav += '<a href="#s-cells">Cells per patient</a>'
    body = []
    for t, md in sections:
        cls = ' class="summary"' if t == "Summary" else ""
        body.append(f'<h2 id="{ids[t]}">{_h.escape(t)}</h2><div{cls}>{_md(md)}</div>')
        if t == "What drives it":
            n = len(a["patients"])
            body.append(f'<h2 id="s-patients">Patients</h2><p class="muted">{n} patients; click '
                        "a column header to sort, an id to see the patient's cells. Rows in red: "
                        "the triage decision was wrong.</p>"
                        + patient_table(a["patients"], a["target_sensitivity"]))
    body.append('<h2 id="s-cells">Cells per patient</h2><div class="gallery">' + gal + "</div>")
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>lymph triage report: {_h.escape(a['chosen'])}</title>"
            f"<style>{_CSS}</style><script>{_JS}</script></head><body>"
            f"<header><h1>lymph triage report</h1></header><nav>{nav}</nav><main>"
            f"<p class=\"muted\">{_md(intro)}</p>" + "\n".join(body) + "</main></body></html>\n")
    return {"html": write_text_atomic(out / "report.html", page)}
