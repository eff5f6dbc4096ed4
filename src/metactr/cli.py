"""The ``metactr`` command line: one entry point, sub-commands registered by each concern.

Errors a user can cause are ``MetactrError``s: printed as one line on stderr, exit code 2, no
traceback (set ``METACTR_DEBUG=1`` to see one). Each concern owns its commands module:

    data ...            metactr.data.commands      (download, synth, prepare, stats)
    models/train/evaluate  metactr.train.commands
    tune                metactr.train.tune_commands (equal-budget Optuna search on validation data)
    reproduce rml       metactr.papers.rml.reproduce
    reproduce metaselector  metactr.papers.metaselector.commands
    bench               metactr.papers.bench.commands
    serve               metactr.serve.commands
"""

from __future__ import annotations

import os
import sys

# Idle OpenMP threads spin-wait by default; on shared CPU cores that stalled a DeepFM training step
# from ~30 ms to 300+ ms. Passive waiting costs nothing measurable on a quiet machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import typer  # noqa: E402
from typer.exceptions import Abort, Exit, TyperException  # noqa: E402

from metactr.errors import MetactrError  # noqa: E402

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  help="CTR prediction under the generalized cold start, with meta-learning.")
reproduce_app = typer.Typer(no_args_is_help=True, help="Reproduce a paper's experiments with confidence intervals.")


_registered = False


def _register_all() -> None:
    """Add every concern's commands, once per process: ``main()`` called again (the tests call it
    hundreds of times in one process) must not register them again, or typer rebuilds an ever
    larger app on each call (the suite's in-process CLI calls grew from 0.2 s to 40 s each)."""
    global _registered
    if _registered:
        return
    _registered = True
    from metactr.data import commands as data_commands
    from metactr.demo import register as register_demo
    from metactr.papers.metaselector import commands as selector_commands
    from metactr.papers.rml import commands as rml_commands
    from metactr.serve import commands as serve_commands
    from metactr.train import commands as train_commands

    app.add_typer(data_commands.app, name="data", help="Download, synthesize, prepare and inspect datasets.")
    train_commands.register(app)
    __import__("metactr.train.tune_commands", fromlist=["register"]).register(app)
    rml_commands.register(reproduce_app)
    selector_commands.register(reproduce_app)
    app.add_typer(reproduce_app, name="reproduce")
    serve_commands.register(app)
    register_demo(app)
    __import__("metactr.papers.bench.commands", fromlist=["register"]).register(app)


def main(argv: list[str] | None = None) -> int:
    debug = bool(os.environ.get("METACTR_DEBUG"))
    try:
        _register_all()
        result = app(args=argv, standalone_mode=False, prog_name="metactr")
        return int(result) if isinstance(result, int) else 0
    except MetactrError as e:
        if debug:
            raise
        print(f"error: {e.one_line()}", file=sys.stderr)
        return e.exit_code
    except Exit as e:
        return e.exit_code
    except (Abort, KeyboardInterrupt):
        print("aborted", file=sys.stderr)
        return 130
    except TyperException as e:  # usage errors (typer vendors click; this is its base class)
        e.show()
        return e.exit_code
    except Exception as e:  # an internal bug: still one line for users, the traceback on request
        if debug:
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"internal error: {type(e).__name__}: {msg} (set METACTR_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
