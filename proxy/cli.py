"""The `tls-sidecar` command: `serve` builds a Config from flags and TLS_SIDECAR_* variables and
hands over; the other commands live in `proxy.commands`, loaded only when they run."""

from __future__ import annotations

import importlib
import sys
from typing import Any, NoReturn

import click
from click.core import ParameterSource

from proxy import __version__
from proxy import log as logs
from proxy.config import ConfigError
from proxy.launch import build_config, run_async, serve_proxy
from proxy.options import CONTEXT, as_set, note_environment, serve_options
from proxy.workers import Supervisor, die_with_parent


class LazyGroup(click.Group):
    """Loads a subcommand's module only when it runs (click's documented pattern): `serve`
    does not pay for `certs`' cryptography, `inject`'s ruamel.yaml or the demo's wsproto."""

    lazy = {
        "certs": ("proxy.commands.certs", "certs_group"),
        "check": ("proxy.commands.check", "check_command"),
        "demo": ("proxy.commands.demo", "demo_command"),
        "inject": ("proxy.commands.inject", "inject_command"),
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy:
            module, attr = self.lazy[cmd_name]
            command = getattr(importlib.import_module(module), attr)
            assert isinstance(command, click.Command)
            return command
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup, context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="tls-sidecar")
def cli() -> None:
    """tls-sidecar: terminate TLS in front of an app and forward plain HTTP/1.1 to it.

    Every option also reads an environment variable, TLS_SIDECAR_<OPTION>.
    """


@cli.command(context_settings=CONTEXT)
@serve_options
def serve(**opts: Any) -> None:
    """Serve TLS on --listen and forward to --upstream; admin endpoints on --admin-listen."""
    note_environment(click.get_current_context())
    config = build_config(opts)
    logs.configure(config.log_format, config.log_level)
    if config.workers > 1 and config.worker_index is None:
        # The workers are this same command, re-executed; the supervisor adds what differs.
        run_async(Supervisor(config, sys.argv[1:]).run(config.workers))
        return
    if config.worker_index is not None:
        die_with_parent()
    run_async(serve_proxy(config))


def _bad_parameter(e: click.BadParameter) -> str:
    """click's message names a flag and its variable together, whichever was used: name the
    one that was."""
    param, ctx = e.param, e.ctx
    if param is None or ctx is None or not param.name:
        return e.format_message()
    from_environment = ctx.get_parameter_source(param.name) is ParameterSource.ENVIRONMENT
    if from_environment and isinstance(param.envvar, str):
        where = param.envvar
    else:
        where = " / ".join(f"'{name}'" for name in param.opts)
    return f"Invalid value for {where}: {e.message}"


def _fail(message: str) -> NoReturn:
    click.echo(f"tls-sidecar: error: {message}", err=True)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    """Entry point: bad input becomes one line on stderr and exit code 2, never a traceback."""
    logs.hold_warnings()  # the console script's start; python -m proxy holds them earlier
    try:
        code = cli.main(args=argv, prog_name="tls-sidecar", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:
        click.echo(e.ctx.get_help() if e.ctx else str(e), err=True)
        sys.exit(2)
    except click.UsageError as e:
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx else ""
        message = _bad_parameter(e) if isinstance(e, click.BadParameter) else e.format_message()
        _fail(message + hint)
    except click.ClickException as e:
        _fail(e.format_message())
    except click.Abort:
        sys.exit(130)
    except ConfigError as e:
        _fail(as_set(str(e)))
    sys.exit(code if isinstance(code, int) else 0)
