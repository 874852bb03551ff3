"""`idgbr-geo` command line: a thin click layer over the library API.

Sub-commands live in one module per concern and are imported lazily, so `idgbr-geo --help`
stays fast (torch is only imported by commands that need it).
"""

from __future__ import annotations

import importlib

import click

#: command name -> "module:attribute" of its click command
COMMANDS = {
    "refine": "idgbr_geo.cli.refine:refine",
    "batch": "idgbr_geo.cli.refine:batch",
    "vectorize": "idgbr_geo.cli.vectorize:vectorize",
    "evaluate": "idgbr_geo.cli.evaluate:evaluate",
    "preview": "idgbr_geo.cli.evaluate:preview",
    "train": "idgbr_geo.cli.train:train",
}


class LazyGroup(click.Group):
    """A click group whose sub-commands are imported only when used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="idgbr-geo")
def main() -> None:
    """Sharpen building, road and land-cover maps from large GeoTIFFs with IDGBR:
    a coarse segmentor plus a guided diffusion boundary refiner."""
