"""``metactr tune CONFIG``: run every method's study to its budget, then write the report files.

See ``train.tune`` for the search itself and docs/tuning.md for the config.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

if TYPE_CHECKING:  # the CLI imports this module at start-up: pydantic, torch and optuna load on use
    from metactr.train.tune import Method, TuneConfig


def _bar(enabled: bool):
    if not (enabled and sys.stderr.isatty() and not os.environ.get("CI")):
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("best {task.fields[best]}"), TimeElapsedColumn(), console=Console(stderr=True))


def _trial_record(t) -> dict[str, Any]:
    from metactr.train.tune import decode

    return {"number": t.number, "state": t.state.name.lower(), "value": t.value, "params": decode(t.params),
            "wall_s": t.user_attrs.get("wall_s"), "run_dir": t.user_attrs.get("run_dir")}


def _fmt_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def tune(cfg: TuneConfig, *, source: str | Path | None = None, out: Path | None = None,
         log=None) -> dict[str, Any]:
    """Run (or continue) every method's study to ``cfg.trials``; write OUT/results.{json,md} and best.yaml."""
    from metactr.config import dump_config
    from metactr.eval.report import write_run
    from metactr.train.tune import METRICS, Method, check_data, counted, open_study, run_trial
    from metactr.utils import write_text_atomic

    out = Path(out or cfg.out)
    log = log or (lambda s: print(s, file=sys.stderr))
    methods = [Method(name, spec, cfg, source) for name, spec in cfg.methods.items()]  # every check first
    for m in methods:
        check_data(m, out / m.name)
    out.mkdir(parents=True, exist_ok=True)
    metric_key, direction = METRICS[cfg.metric]
    results: dict[str, Any] = {"metric": cfg.metric, "direction": direction, "trials_per_method": cfg.trials,
                               "seed": cfg.seed, "study": str(out / "study.db"), "methods": {}}
    bar = _bar(cfg.progress)
    say = (lambda s: bar.console.print(s, highlight=False, markup=False)) if bar is not None else log
    with bar if bar is not None else nullcontext():
        for index, m in enumerate(methods):
            study = open_study(m, cfg, out, index)
            done = len(counted(study))
            task = bar.add_task(m.name, total=cfg.trials, completed=min(done, cfg.trials),
                                best=_best_text(study)) if bar is not None else None
            t0 = time.perf_counter()
            while done < cfg.trials:
                r = run_trial(m, study, cfg, out)
                done += 1
                score = "no score" if r["value"] is None else f"{cfg.metric} {r['value']:.4f}"
                say(f"{m.name} trial {done}/{cfg.trials} (#{r['number']}): {score} "
                    f"[{_fmt_params(r['params'])}] {r['wall_s']:.1f} s")
                if bar is not None:
                    bar.update(task, completed=done, best=_best_text(study))
            results["methods"][m.name] = _summary(m, study, cfg, out, time.perf_counter() - t0)
            best = results["methods"][m.name]
            if best["best_params"] is not None:
                best_cfg = m.trial_config(best["best_params"], out / m.name / "best_run", for_trial=False)
                header = (f"# {m.name} tuned by `metactr tune` ({best['n_trials']} trials, seed "
                          f"{cfg.seed}): best {cfg.metric} {best['best_value']:.4f} (trial "
                          f"#{best['best_trial']}) on split '{m.cfg.data.valid_split}'\n# base config: {m.path}; "
                          f"tuned: {_fmt_params(best['best_params'])}\n"
                          f"# trials ran with --set {' '.join([*cfg.set, *m.spec.set]) or '(none)'} (kept below); "
                          "the test split is restored\n")
                write_text_atomic(out / m.name / "best.yaml", header + dump_config(best_cfg))
                best["best_config"] = str(out / m.name / "best.yaml")
    write_run(out, results, _markdown(results, metric_key))
    return results


def _best_text(study) -> str:
    try:
        return f"{study.best_value:.4f}"
    except ValueError:  # no complete trial yet
        return "–"


def _summary(m: Method, study, cfg: TuneConfig, out: Path, wall_now: float) -> dict[str, Any]:
    from metactr.train.tune import decode

    trials = [_trial_record(t) for t in study.get_trials(deepcopy=False)]
    finished = [t for t in trials if t["state"] in ("complete", "pruned")]
    try:
        bt = study.best_trial
        best = {"best_value": bt.value, "best_params": decode(bt.params), "best_trial": bt.number,
                "best_run_dir": bt.user_attrs.get("run_dir")}
    except ValueError:
        best = {"best_value": None, "best_params": None, "best_trial": None, "best_run_dir": None}
    return {"config": str(m.path), "valid_split": m.cfg.data.valid_split, "n_trials": len(finished), **best,
            "wall_s": sum(t["wall_s"] or 0.0 for t in finished), "wall_s_this_run": wall_now,
            "space": {k: v.model_dump(exclude_none=True) for k, v in m.space.items()}, "trials": trials}


def _markdown(results: dict[str, Any], metric_key: str) -> str:
    from metactr.eval.report import markdown_table

    rows = [[name, r["n_trials"], r["best_value"], f"#{r['best_trial']}" if r["best_trial"] is not None else "–",
             _fmt_params(r["best_params"] or {}) or "–", f"{r['wall_s']:.1f}"] for name, r in results["methods"].items()]
    return (f"# metactr tune: {results['trials_per_method']} trials per method, TPE seed {results['seed']}\n\n"
            f"Scored on each config's validation split ({results['metric']}, {results['direction']}); "
            "the test split is never read.\n\n"
            + markdown_table(["method", "trials", results["metric"], "best trial", "best params", "wall s"], rows))


def tune_command(
    config: Annotated[Path, typer.Argument(help="YAML tune config (see configs/tune/).")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a key of the tune config: a.b=value (repeatable).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run directory (default: the config's out).")] = None,
) -> None:
    """Tune every method of CONFIG with the same trial budget, on validation data (resumable)."""
    import json

    from metactr.train.tune import load_tune_config

    cfg = load_tune_config(config, set_ or [])
    results = tune(cfg, source=config, out=out)
    summary = {name: {k: r[k] for k in ("n_trials", "best_value", "best_params", "wall_s", "best_config") if k in r}
               for name, r in results["methods"].items()}
    typer.echo(json.dumps(summary, indent=2))


def register(app: typer.Typer) -> None:
    app.command("tune")(tune_command)
