"""Training criteria selectable from a model YAML's ``loss:`` section; importing this package registers them all.

Each family lives in its own module and registers its classes with ``@register_loss``.
"""

import importlib

# One entry per loss family module; add yours here.
FAMILIES = ("dcloss", "better_sampling", "esod")

for _name in FAMILIES:
    importlib.import_module(f"so_det_ultra.losses.{_name}")
