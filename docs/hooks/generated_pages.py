"""MkDocs hook: stand-ins for the results pages that a script generates from data files.

``docs/results/README.md`` (the current results) and the study pages under ``docs/results/`` are
written by the results script, not by hand. A checkout made before they were first generated
still builds the site: each missing page becomes a short page saying how to generate it, so
links to it resolve. A page that exists is never replaced.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mkdocs.structure.files import File, Files

log = logging.getLogger("mkdocs.hooks.generated_pages")

#: Generated pages the hand-written pages link to, and what makes them.
GENERATED_PAGES: dict[str, str] = {
    "results/README.md": "the current results tables",
    "results/residual-study-imagenet/README.md": "the residual study on ImageNet",
}

_STAND_IN = """# {title}

This page is generated from the result files under `docs/results/`, and this copy of the
project does not have it yet. The investigations behind the results are in the [notes]({notes}).
"""


def stand_in(src_uri: str, what: str) -> str:
    """The Markdown of the stand-in page for the generated page ``src_uri``."""
    depth = src_uri.count("/")
    notes = "../" * depth + "notes/index.md"
    return _STAND_IN.format(title=what[0].upper() + what[1:], notes=notes)


def on_files(files: Files, config) -> Files:  # noqa: ANN001 - MkDocs' own signature
    docs_dir = Path(config["docs_dir"])
    for src_uri, what in GENERATED_PAGES.items():
        if files.get_file_from_path(src_uri) is None and not (docs_dir / src_uri).is_file():
            log.info("%s is not generated yet: a stand-in page links to the lab notebook", src_uri)
            files.append(File.generated(config, src_uri, content=stand_in(src_uri, what)))
    return files
