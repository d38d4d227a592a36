"""CLI command groups that live beside their feature; each module has ``register(app)``."""

from __future__ import annotations

import importlib

import typer

COMMAND_MODULES = ("classifier", "evaluation", "residual_study", "zoo")


def register_all(app: typer.Typer) -> None:
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"comdefend.commands.{name}")
        except ModuleNotFoundError as error:
            if error.name == f"comdefend.commands.{name}":
                continue  # feature not installed in this build
            raise
        module.register(app)
