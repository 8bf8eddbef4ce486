"""Search spaces and run-config presets of the JEPA hyperparameter studies.

``load_space("quick")`` loads and validates a shipped space (or any space file);
``preset_path("hybrid")`` / ``load_preset`` give the run-config presets.
"""

from search_spaces.space import (SpaceError, SpaceSpec, load_preset, load_space,
                                 preset_path, shipped_presets, shipped_spaces)

__all__ = ["SpaceError", "SpaceSpec", "load_preset", "load_space", "preset_path",
           "shipped_presets", "shipped_spaces"]
