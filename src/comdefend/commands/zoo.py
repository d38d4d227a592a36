"""``comdefend zoo list``: the pretrained models shipped with the package."""

from __future__ import annotations

import json

import typer


def register(app: typer.Typer) -> None:
    zoo = typer.Typer(help="Pretrained models shipped with the package.", no_args_is_help=True)

    @zoo.command("list")
    def list_command(
        as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
        verify: bool = typer.Option(False, "--verify", help="Check every file's sha256."),
    ) -> None:
        """List zoo models with dataset, architecture, metrics and provenance.

        Entries converted from another package are listed too; --verify converts and checks
        those whose package is installed and says which are not.
        """
        from comdefend.zoo import get_entry, list_pretrained, pretrained_path

        entries = [get_entry(name) for name in list_pretrained()]
        if verify:
            for entry in entries:
                if not entry.installed:
                    assert entry.source is not None  # shipped entries are always installed
                    hint = entry.source.install_hint()
                    typer.echo(f"{entry.name}: not installed, not verified ({hint})", err=True)
                    continue
                pretrained_path(entry.name, verify=True)
        if as_json:
            typer.echo(json.dumps([e.to_dict() for e in entries], indent=2))
            return
        if not entries:
            typer.echo("no pretrained models are shipped in this build")
            return
        width = max(len(entry.name) for entry in entries) + 2
        arch = max(len(entry.architecture) for entry in entries) + 2
        for entry in entries:
            metrics = ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in entry.metrics.items()
            )
            typer.echo(
                f"{entry.name:<{width}}{entry.kind:<11}{entry.dataset:<15}{entry.architecture:<{arch}}"
                f"{entry.iterations:>7} it  {metrics}"
            )

    app.add_typer(zoo, name="zoo")
