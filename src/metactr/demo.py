"""``metactr demo``: the README's first command, and the main job in small: a benchmark.

Synthesize a seeded click log with drifting interests (the generator keeps each click's true
probability) -> prepare it with the RML generalized cold-start protocol and the powered
``future`` holdout -> print its statistics -> ``metactr bench`` on it: the simple baselines, a
plain deep model, RML with and without meta-learning, and the label-aware RML trained plainly and
with session-level MAML (each session adapted on its own labelled history, the inner rate chosen
on validation rows cut from training), two seeds, every model fine-tuned on FT-A, FT-B, FT-C ->
the leaderboard with 95% intervals (seeds x test users), the paired differences against the
strongest simple baseline, whether the session adaptation and the label-aware input help (paired
contrasts), the Bayes ceiling and the report's path. Sized to run in a few minutes on two cores.
"""

from __future__ import annotations

from pathlib import Path

import typer

DEMO_USERS, DEMO_ITEMS, DEMO_ROWS, DEMO_SEED = 1200, 600, 120_000, 7
DEMO_METHODS = ["popularity", "rates_lr", "basic", "din", "rml_wo_meta", "rml", "rml_wo_meta_label",
                "rml_session_maml_label"]
# session-level MAML on the label-aware RML (issue 15; configs/bench/inner_select.yaml), and the
# contrasts that say whether its adaptation, and the label-aware input, help on this log
DEMO_EXTRA = {
    "rml_wo_meta_label": {"model": "rml", "model_kw": {"label_aware": True}},
    "rml_session_maml_label": {
        "model": "rml", "strategy": "session_maml", "model_kw": {"dropout": 0.0, "label_aware": True},
        "strategy_kw": {"adapt_groups": ["meta"], "inner_lr": 0.1, "inner_steps": 1, "history_size": 5, "epochs": 1},
        # (the bench grid tries 0.1, 3 and 30; two candidates keep the demo to a few minutes)
        "protocol": {"strategy_select": {"inner_lr": [0.1, 30.0]}}},
}
DEMO_CONTRASTS = ["rml_session_maml_label:rml_wo_meta_label", "rml_wo_meta_label:rml_wo_meta", "rml:rml_wo_meta"]


def synthesize_step(out: Path) -> Path:
    from metactr.data.synth import generate

    # interests drift (rho < 1) but slowly enough, and exposure follows interest strongly enough,
    # that a session says something about the next click (docs/synthetic.md)
    return generate(out / "raw" / "interactions.parquet", n_users=DEMO_USERS, n_items=DEMO_ITEMS,
                    n_rows=DEMO_ROWS, seed=DEMO_SEED, rho=0.95, exposure_temp=2.0)


def prepare_step(raw: Path, out: Path) -> Path:
    from metactr.data.pipeline import PrepareConfig, prepare

    cfg = PrepareConfig(protocol="rml", seed=DEMO_SEED, rml={"holdout": "future"})
    return prepare("synthetic", raw, out / "prepared", cfg)


def stats_step(prepared: Path) -> list[dict]:
    from metactr.data.stats import print_stats

    return print_stats(prepared)


def bench_config(prepared: Path, *, seeds: int = 2, epochs: float = 3.0, methods=None):
    from metactr.papers.bench.config import BenchConfig

    methods = list(methods or DEMO_METHODS)
    return BenchConfig.model_validate({
        "protocol": "rml", "datasets": [{"name": "synthetic", "prepared": str(prepared)}],
        "methods": methods, "seeds": seeds, "n_boot": 500,
        "contrasts": [c for c in DEMO_CONTRASTS if all(m in methods for m in c.split(":"))],
        "rml": {"strategy": {"epochs": epochs, "batch_size": 256},
                "method": {m: v for m, v in DEMO_EXTRA.items() if m in methods}}})


def bench_step(prepared: Path, out: Path, *, jobs: int = 2, **kw) -> dict:
    """``metactr bench`` on the prepared log; writes ``out/bench`` and prints the leaderboard."""
    import os

    from metactr.papers.bench.commands import print_leaderboard
    from metactr.papers.bench.run import run_bench

    res = run_bench(bench_config(prepared, **kw), out / "bench", jobs=max(1, min(jobs, os.cpu_count() or 1)),
                    echo=lambda s: None, command=f"metactr demo --out {out}")
    print_leaderboard(res)
    return res


def run_demo(out: Path) -> Path:
    """Run every demo step under ``out``; returns the prepared directory."""
    from metactr.utils import claim_out_dir

    out = Path(out).resolve()  # (the bench finds the raw log, for the Bayes ceiling, by its recorded path)
    claim_out_dir(out, what="demo output", command="metactr demo")  # never over a foreign folder
    raw = synthesize_step(out)
    typer.echo(f"[1/4] synthetic log: {raw}")
    prepared = prepare_step(raw, out)
    typer.echo(f"[2/4] prepared (RML generalized cold start, future holdout): {prepared}")
    typer.echo("[3/4] statistics per split:")
    stats_step(prepared)
    typer.echo(f"[4/4] metactr bench: {', '.join(DEMO_METHODS)}; 2 seeds; fine-tuned on FT-A, FT-B, FT-C; "
               "95% intervals over seeds x test users; bayes_ceiling = the generator's true probabilities; "
               "contrasts: does session-level adaptation (and label-aware input) help?")
    res = bench_step(prepared, out)
    typer.echo(f"\nleaderboard: {out / 'bench' / 'results.md'}\nreport:      {out / 'bench' / 'report.html'}"
               f"\n(wall {res['wall_s']} s)")
    return prepared


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(out: Path = typer.Option(Path("runs/demo"), "--out", help="output directory")) -> None:
        """Synthesize a cold-start log, prepare it, print its statistics, then benchmark simple
        baselines, DIN and RML on it with intervals and the Bayes ceiling."""
        run_demo(out)
