"""Jinja2 templates of the objects Kiln creates, rendered once into dicts.

Every value enters a template through the `tojson` filter as a JSON scalar or structure, so a name,
label or env value holding quotes, newlines or template syntax stays a string and cannot add fields.
`*.json.j2` templates are loaded with json (the per-TrainingJob ones: in a burst of hundreds the YAML
parser was the operator's largest CPU cost), `*.yaml.j2` ones with libyaml.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import jinja2
import yaml


class RenderError(ValueError):
    """The resource cannot be rendered; `field` names the spec field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.detail = message


def _tojson(value: Any) -> str:
    return json.dumps(value, ensure_ascii=True)


@functools.cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("kiln_operator", "templates"),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
    )
    env.filters["tojson"] = _tojson
    return env


# libyaml when present: the pure-Python parser costs ~10 ms per TrainingJob, which adds up in a burst.
Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
Dumper: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def render_template(name: str, **context: Any) -> list[dict[str, Any]]:
    """Render one template into its documents: `*.yaml.j2` (YAML stream) or `*.json.j2` (an object or a list)."""
    text = environment().get_template(name).render(**context)
    if name.endswith(".json.j2"):
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as exc:  # a template bug, never user input (values enter through tojson)
            raise RuntimeError(f"template {name} rendered invalid JSON: {exc}") from exc
        return [doc for doc in (loaded if isinstance(loaded, list) else [loaded]) if doc]
    return [doc for doc in yaml.load_all(text, Loader=Loader) if doc]
