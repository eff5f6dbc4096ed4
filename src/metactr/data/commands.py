"""``metactr data ...``: download, synth, prepare, stats."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True, help="Download, synthesize, prepare and inspect datasets.")


@app.command()
def download(name: str = typer.Argument(..., help="ml-1m, ml-100k, ml-latest-small, ml-25m, ml-32m or book-crossing "
                                        "(avazu/amazon: prints where)"),
             dest: Path = typer.Option(Path("data/raw"), "--dest", help="folder that receives <name>/"),
             sha256: str | None = typer.Option(None, "--sha256", help="pin the archive's SHA-256"),
             url: str | None = typer.Option(None, "--url", help="another URL (mirror, file://) for the archive")) -> None:
    """Download and verify (MD5/SHA-256) an official dataset archive, extract it atomically."""
    from metactr.data.download import download_dataset

    path = download_dataset(name, dest, url=url, sha256=sha256, echo=typer.echo)
    if path is not None:
        typer.echo(f"{name} ready at {path}")


@app.command()
def synth(out: Path = typer.Option(..., "--out", help="interaction Parquet file to write"),
          users: int = typer.Option(2000, "--users"), items: int = typer.Option(1000, "--items"),
          rows: int = typer.Option(100_000, "--rows"), seed: int = typer.Option(0, "--seed"),
          topics: int = typer.Option(8, "--topics", help="latent dimension / number of item topics"),
          propensity_sigma: float = typer.Option(0.0, "--propensity-sigma",
                                                 help="sd of a per-user click propensity that drifts over the log "
                                                      "(0: none; docs/synthetic.md)"),
          propensity_periods: int = typer.Option(60, "--propensity-periods",
                                                 help="periods the propensity changes over"),
          propensity_rho: float = typer.Option(0.9, "--propensity-rho",
                                               help="AR(1) coefficient of the propensity between periods")) -> None:
    """Generate a seeded synthetic click log (latent interests that drift; logistic clicks)."""
    from metactr.data.synth import generate
    from metactr.utils import check_out_file

    out = Path(out)
    for p, cols in ((out, SYNTH_COLUMNS), (out.with_name(out.stem + ".users.parquet"), SYNTH_USER_COLUMNS),
                    (out.with_name(out.stem + ".items.parquet"), SYNTH_ITEM_COLUMNS)):
        check_out_file(p, is_ours=lambda f, cols=cols: _parquet_columns(f) == cols, what="synthetic data")
    path = generate(out, n_users=users, n_items=items, n_rows=rows, seed=seed, n_topics=topics,
                    propensity_sigma=propensity_sigma, propensity_periods=propensity_periods,
                    propensity_rho=propensity_rho)
    typer.echo(f"wrote {rows:,} interactions to {path}")


SYNTH_COLUMNS = ["user_id", "item_id", "timestamp", "click", "p_click"]  # what `data synth` writes
SYNTH_USER_COLUMNS = ["user_id", "segment", "activity"]
SYNTH_ITEM_COLUMNS = ["item_id", "topic", "popularity"]


def _parquet_columns(path: Path) -> list[str] | None:
    """The column names of a Parquet file, None when it is not one (then it is not ours to replace)."""
    import pyarrow.parquet as pq

    try:
        return list(pq.read_schema(path).names)
    except Exception:  # not Parquet, unreadable: not ours
        return None


@app.command()
def prepare(dataset: str = typer.Option(..., "--dataset", help="ml-1m, ml-100k, movielens (any release, detected), "
                                        "movielens-csv, book-crossing, avazu, amazon, custom, synthetic"),
            data_dir: Path = typer.Option(..., "--data-dir", help="raw files (folder, or the Parquet file for synthetic)"),
            out: Path = typer.Option(..., "--out", help="prepared directory to write"),
            config: Path | None = typer.Option(None, "--config", help="YAML PrepareConfig"),
            set_: list[str] = typer.Option([], "--set", help="override a config key: key.path=value"),
            force: bool = typer.Option(False, "--force", help="rebuild even when the cache is up to date (only ever "
                                                         "replaces metactr's own output)"),
            on_bad_rows: str | None = typer.Option(None, "--on-bad-rows",
                                                   help="error (default) or skip: drop rows with impossible values "
                                                        "(counted in meta.json); same as --set on_bad_rows=..."),
            quiet: bool = typer.Option(False, "--quiet", help="do not print the statistics table")) -> None:
    """Read, encode and split a dataset into a prepared directory (cached by config + input)."""
    from metactr.config import load_config
    from metactr.data.pipeline import PrepareConfig
    from metactr.data.pipeline import prepare as run_prepare
    from metactr.data.stats import print_stats

    if on_bad_rows is not None:
        set_ = [*set_, f"on_bad_rows={on_bad_rows}"]
    cfg = load_config(PrepareConfig, config, set_)
    before = _meta_mtime(out)
    path = run_prepare(dataset, data_dir, out, cfg, force=force)
    reused = before is not None and before == _meta_mtime(out)
    typer.echo(f"{'up to date (cached)' if reused else 'prepared'}: {path}")
    if not quiet:
        print_stats(path)


def _meta_mtime(out: Path) -> int | None:
    p = Path(out) / "meta.json"
    return p.stat().st_mtime_ns if p.is_file() else None


@app.command()
def stats(directory: Path = typer.Argument(..., help="a prepared directory"),
          as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table")) -> None:
    """Users, items, samples, sparsity and positive rate of every split."""
    from metactr.data.stats import print_stats, split_stats

    if as_json:
        typer.echo(json.dumps(split_stats(directory), indent=2))
    else:
        print_stats(directory)
