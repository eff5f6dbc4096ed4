"""``metactr bench``'s report.html: one self-contained file (figures as base64 PNG, no external
resource): per dataset and subset the leaderboard, per-batch test AUC boxplots and ridgelines
(RML Fig. 4), AUC across the fine-tuning stages, the per-user loss KDE (MetaSelector Fig. 3), and
the split statistics of every prepared directory."""

from __future__ import annotations

import base64
import html

from metactr.eval import bench_plots as bp
from metactr.eval.bench_report import STAGE_LABELS, ci, dataset_title, leaderboard
from metactr.eval.report import fmt

CSS = """body{font-family:sans-serif;max-width:1150px;margin:1em auto;color:#222}
table{border-collapse:collapse;font-size:13px;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 7px}
th{background:#eee}.figs{display:flex;flex-wrap:wrap;gap:8px}.figs img{max-width:560px;border:1px solid #ddd}
.warn{color:#a40}"""


def img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def md_table_to_html(md: str) -> str:
    lines = [ln for ln in md.strip().splitlines() if ln.startswith("|")]
    if len(lines) < 2:
        return ""
    cells = lambda ln: [c.strip() for c in ln.strip("|").split("|")]  # noqa: E731
    out = ["<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cells(lines[0])) + "</tr>"]
    for ln in lines[2:]:
        row = []
        for c in cells(ln):
            t = html.escape(c)
            if t.startswith("**") and t.endswith("**"):
                t = f"<b>{t[2:-2]}</b>"
            row.append(f"<td>{t}</td>")
        out.append("<tr>" + "".join(row) + "</tr>")
    return "\n".join(out + ["</table>"])


def _stats_table(rows: list[dict]) -> str:
    keys = ["split", "users", "items", "samples", "pos_rate"]
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(r.get(k)) if isinstance(r.get(k), float) else str(r.get(k)))}"
                                    "</td>" for k in keys) + "</tr>" for r in rows)
    return "<table><tr>" + "".join(f"<th>{k}</th>" for k in keys) + "</tr>" + body + "</table>"


def render_html(res: dict, figs: dict) -> str:
    final = res["final_stage"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>metactr bench ({res['protocol']})</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>metactr bench: <code>{html.escape(res['protocol'])}</code> protocol</h1>",
             f"<p>Seeds {res['seeds']}" + (f", split seeds {res['split_seeds']}" if res.get("split_seeds") else "")
             + f"; {res['n_jobs']} jobs; wall time {fmt(res.get('wall_s'), 1)} s. Intervals: 95% over training "
             "seeds x a bootstrap of test users; Δ is the paired difference against the reference on the same "
             "resamples (bold: its interval excludes 0).</p>"]
    if res.get("command"):
        parts.append(f"<p>Command: <code>{html.escape(res['command'])}</code></p>")
    for name, label in res["datasets"].items():
        parts.append(f"<h2>{html.escape(dataset_title(label))}</h2>")
        for (dname, sub), fig in figs.items():
            if dname != name:
                continue
            table, rows = leaderboard(res, name, sub, final)
            if not rows:
                continue
            tag = f"{name} {sub.upper()}" if sub else name
            parts.append(f"<h3>{html.escape(tag)}: {STAGE_LABELS.get(final, final)}, {rows[0]['n_test']:,} test rows, "
                         f"{rows[0]['n_users']:,} users</h3>")
            parts.append(md_table_to_html(table))
            order = [r["method"] for r in rows]
            pics = []
            ba = {m: fig["batch_auc"][m] for m in order if m in fig["batch_auc"]}
            if any(len(a) for a in ba.values()):
                t = f"AUC per test batch of {res.get('batch_rows', 128)} rows, {tag} (all seeds)"
                pics += [img(bp.batch_auc_box(ba, t), "per-batch AUC boxplot"),
                         img(bp.batch_auc_ridge(ba, t), "per-batch AUC ridgeline")]
            else:
                parts.append("<p class='warn'>test set smaller than one batch: no per-batch figure</p>")
            series = {m: {st: (s.auc_mean, *s.auc_ci95) for st, s in by.items()} for m, by in fig["stage_auc"].items()}
            stages = [s for s in STAGE_LABELS if any(s in by for by in series.values())]
            if len(stages) > 1:
                pics.append(img(bp.stage_auc(series, stages, STAGE_LABELS, f"AUC across fine-tuning stages, {tag}"),
                                "AUC across stages"))
            ref = fig.get("reference")
            best = next((m for m in order if m != ref and not any(r["upper_bound"] for r in rows if r["method"] == m)),
                        None)
            kde = {m: fig["user_loss"][m] for m in dict.fromkeys([best, ref, "bayes_ceiling"]) if m in fig["user_loss"]}
            if kde:
                pics.append(img(bp.user_loss_kde(kde, f"Per-user test LogLoss, {tag} (seed 1 of each)"),
                                "per-user loss KDE"))
            parts.append("<div class='figs'>" + "".join(pics) + "</div>")
    parts.append("<h2>Split statistics</h2>")
    for key, st in (res.get("split_stats") or {}).items():
        parts.append(f"<h3>{html.escape(key)}</h3>" + _stats_table(st["rows"]))
        parts += [f"<p class='warn'>{html.escape(w)}</p>" for w in st["warnings"]]
    parts.append("</body></html>")
    return "\n".join(parts)


__all__ = ["render_html", "ci"]
