"""The `coheara` command line. Errors are one line on stderr with a documented exit code."""

from __future__ import annotations

import typer

from coheara.cli.ask import ask
from coheara.cli.audit import audit_app
from coheara.cli.bench import bench
from coheara.cli.common import err_console, report
from coheara.cli.dev import dev_app
from coheara.cli.doctor import doctor
from coheara.cli.eval import eval_command
from coheara.cli.finetune import adapters_app, finetune_command
from coheara.cli.image import image_app
from coheara.cli.keys import keys_app
from coheara.cli.model import model_app
from coheara.cli.plan import plan_command
from coheara.cli.selftest import selftest
from coheara.cli.serve import serve
from coheara.cli.tasks import run, tasks
from coheara.errors import CohearaError

app = typer.Typer(
    name="coheara",
    help="Run MedGemma 1.5 4B on this site's hardware: every output a draft for a clinician.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command()(ask)
app.command()(serve)
app.command()(selftest)
app.command()(doctor)
app.command("plan")(plan_command)
app.command()(bench)
app.command("eval")(eval_command)
app.command("finetune")(finetune_command)
app.command()(tasks)
app.command()(run)
app.add_typer(dev_app, name="dev")
app.add_typer(image_app, name="image")
app.add_typer(audit_app, name="audit")
app.add_typer(model_app, name="model")
app.add_typer(keys_app, name="keys")
app.add_typer(adapters_app, name="adapters")


def main() -> None:
    try:
        app()
    except CohearaError as error:
        report(error)
        raise SystemExit(error.exit_code) from None
    except KeyboardInterrupt:
        err_console.print("interrupted")
        raise SystemExit(130) from None
    except Exception as exc:  # the last line of defence: never a traceback for a user
        # Only the type: an unexpected error's text may quote the input.
        err_console.print(
            f"[bold red]error:[/] internal error ({type(exc).__name__}); "
            "please report it with the command you ran"
        )
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
