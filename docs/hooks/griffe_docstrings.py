"""Griffe extension for the API reference: the package's docstrings as mkdocstrings reads them.

The docstrings follow the Google style with two habits of the reStructuredText world, which
this extension translates when the site is built (the source stays as it is):

* an ``Example:`` section (kornia's spelling) is read as Google's ``Examples:`` section, so its
  ``>>>`` lines render as code;
* Sphinx roles such as ``:class:`~comdefend.zoo.WeightsRef``` become inline code
  (```WeightsRef```), as ``~`` asks.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE_HEADER = re.compile(r"^(\s*)Example:[ \t]*$", re.M)
_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj|const):`(~?)([^`]+)`")


def _role(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


def translate(text: str) -> str:
    """A docstring with ``Example:`` read as ``Examples:`` and Sphinx roles as inline code."""
    return _ROLE.sub(_role, _EXAMPLE_HEADER.sub(r"\1Examples:", text))


class ReadableDocstrings(griffe.Extension):
    """Translate every docstring of the loaded package (see the module docstring)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = translate(obj.docstring.value)
