"""``comdefend zoo``: the pretrained models, their cards, and adding to them.

``list`` shows every entry with its headline robust accuracy, ``show NAME`` prints a whole model
card, ``register NAME --weights FILE`` adds a finished run's weights, ``card NAME --results
FILE`` attaches an evaluation's measurements to a card. ``--registry PATH`` works on another
``registry.json`` than the package's (its weights lie in ``weights/`` beside it).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer


def _registry_option() -> Path | None:
    return typer.Option(
        None,
        "--registry",
        help="A registry .json file (or a folder holding registry.json) to use instead of the "
        "package's zoo; its weights lie in weights/ beside it.",
    )


def _check_registry(registry: Path | None, must_exist: bool = True) -> Path | None:
    from comdefend.errors import UsageError
    from comdefend.zoo import registry_file

    if registry is not None and must_exist and not registry_file(registry).is_file():
        raise UsageError(f"--registry {registry}: no registry.json there")
    return registry


def register(app: typer.Typer) -> None:
    zoo = typer.Typer(
        help="Pretrained models: list them, show a model card, register weights, attach "
        "measurements.",
        no_args_is_help=True,
    )

    @zoo.command("list")
    def list_command(
        as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
        verify: bool = typer.Option(False, "--verify", help="Check every file's sha256."),
        registry: Path | None = _registry_option(),
    ) -> None:
        """List zoo models: dataset, image size and mode, clean and headline robust accuracy.

        The robust column quotes one measured number with its conditions (an adaptive threat
        model first, then the budget closest to 8/255, then the worst attack); "—" where none
        was measured yet (comdefend zoo show NAME says how to measure it). Entries converted
        from another package are listed too; --verify converts and checks those whose package
        is installed and says which are not. --json prints every entry with its card.
        """
        from comdefend.zoo import get_entry, list_pretrained, pretrained_path
        from comdefend.zoo.cards import clean_text, headline, headline_text, purpose_text

        _check_registry(registry)
        entries = [get_entry(name, registry) for name in list_pretrained(registry=registry)]
        if verify:
            for entry in entries:
                if not entry.installed:
                    assert entry.source is not None  # shipped entries are always installed
                    hint = entry.source.install_hint()
                    typer.echo(f"{entry.name}: not installed, not verified ({hint})", err=True)
                    continue
                pretrained_path(entry.name, verify=True, registry=registry)
        if as_json:
            listed = []
            for entry in entries:
                chosen = headline(entry.card.measurements, entry.dataset)
                item = entry.to_dict()
                item["headline"] = None if chosen is None else chosen[0].to_dict()
                listed.append(item)
            typer.echo(json.dumps(listed, indent=2))
            return
        if not entries:
            typer.echo("no pretrained models are shipped in this build")
            return
        rows = [("NAME", "KIND", "DATASET", "TRAINED ON", "CLEAN", "ROBUST (headline)")]
        rows += [
            (
                e.name,
                e.kind,
                e.dataset,
                purpose_text(e),
                clean_text(e),
                headline_text(e),
            )
            for e in entries
        ]
        widths = [max(len(row[i]) for row in rows) + 2 for i in range(5)]
        for row in rows:
            typer.echo(
                "".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + row[5]
            )

    @zoo.command("show")
    def show_command(
        name: str = typer.Argument(..., help="The zoo entry (comdefend zoo list)."),
        as_json: bool = typer.Option(False, "--json", help="The card as JSON."),
        registry: Path | None = _registry_option(),
    ) -> None:
        """Print a model card: what the model is for (dataset, image size, patch or full
        mode), its measured clean and robust accuracy with every condition (threat model,
        attack and budget, steps, classifier, images, source results.json), "not measured yet"
        with the command that would measure it, and its training provenance."""
        from comdefend.zoo import get_entry, list_pretrained
        from comdefend.zoo.cards import card_dict, render_card

        _check_registry(registry)
        entry = get_entry(name, registry)
        zoo_entries = [get_entry(n, registry) for n in list_pretrained(registry=registry)]
        if as_json:
            typer.echo(json.dumps(card_dict(entry, zoo_entries), indent=2))
        else:
            typer.echo(render_card(entry, zoo_entries))

    @zoo.command("register")
    def register_command(
        name: str = typer.Argument(..., help="The new entry's name."),
        weights: Path = typer.Option(
            ...,
            "--weights",
            help="The checkpoint to ship: a finished run's model.safetensors (final weights) "
            "or best.safetensors, or the run folder (its final weights); summary.json must lie "
            "beside it.",
        ),
        command: str = typer.Option(..., "--command", help="The exact command that trained it."),
        hardware: str = typer.Option(..., "--hardware", help="What it was trained on."),
        notes: str = typer.Option("", "--notes", help="Free text kept in the entry."),
        license_name: str = typer.Option("MIT", "--license", help="The weights' license."),
        intended_use: str = typer.Option(
            "", "--intended-use", help="What the model is for (the card's first line)."
        ),
        if_collapsed: str = typer.Option(
            "refuse",
            "--if-collapsed",
            help="A run that collapsed: refuse its final weights, or ship its best evaluated "
            "ones (best) and say so in the notes.",
        ),
        replace: bool = typer.Option(False, "--replace", help="Replace an entry of the same name."),
        measure: bool = typer.Option(
            True,
            "--measure/--no-measure",
            help="Record the metric on the dataset's embedded sample (500 images).",
        ),
        registry: Path | None = _registry_option(),
    ) -> None:
        """Add a finished training run's weights to the zoo.

        Copies the checkpoint to weights/NAME.safetensors beside the registry, records its
        sha256, the training command, hardware, metrics and the card's purpose (dataset, image
        size, purify mode), and measures it on the embedded sample. A run whose summary says
        it collapsed is refused unless --if-collapsed best. Attach evaluation numbers
        afterwards with comdefend zoo card NAME --results results.json.
        """
        from comdefend.zoo.registration import register_weights

        _check_registry(registry, must_exist=False)
        entry = register_weights(
            name,
            weights,
            command=command,
            hardware=hardware,
            notes=notes,
            license=license_name,
            intended_use=intended_use,
            if_collapsed=if_collapsed,
            replace=replace,
            registry=registry,
            measure=measure,
            echo=lambda line: typer.echo(line, err=True),
        )
        typer.echo(json.dumps(entry, indent=2))

    @zoo.command("card")
    def card_command(
        names: list[str] = typer.Argument(None, help="The entries to attach measurements to."),
        results: Path = typer.Option(
            ..., "--results", help="An evaluation's results.json (comdefend evaluate --out)."
        ),
        defense: str | None = typer.Option(
            None,
            "--defense",
            help="A purifier's defense spec as the results name it (default: every defense "
            "that ran the entry's weights, matched by sha256).",
        ),
        every: bool = typer.Option(
            False, "--all", help="Attach to every entry the results measure."
        ),
        registry: Path | None = _registry_option(),
    ) -> None:
        """Attach an evaluation's clean and robust accuracies to model cards.

        Reads the numbers from results.json (never typed): a purifier gets the rows of every
        defense that ran its weights, a classifier the undefended ('none') rows of an
        evaluation of it; each keeps its threat model, attack, budget, steps, classifier,
        image count and the file's path (relative to the current folder: run it from the
        repository root). Attaching the same file again replaces its numbers.
        """
        from comdefend.zoo.registration import attach_results

        _check_registry(registry)
        attached = attach_results(
            list(names or []), results, defense=defense, registry=registry, every=every
        )
        for name, found in attached.items():
            robust = sum(1 for m in found if m.robust)
            typer.echo(
                f"{name}: {len(found) - robust} clean and {robust} robust accuracies from "
                f"{found[0].source}"
            )

    app.add_typer(zoo, name="zoo")
