"""Compose the training config exactly as ``dsv3-train`` will, but before any process exists.

The launcher passes Hydra overrides through unchanged, so it composes them here with the same
``configs/`` tree and the same typed dataclasses, which runs every rule of ``dsv3_train.config``
(and ``parallel.mesh``) up front. Composition errors become :class:`ConfigError` one-liners.
"""
from __future__ import annotations

import contextlib

from dsv3_train.config import Config, ConfigError, register_configs, to_config

PARALLEL_INT_KEYS = ("pp", "dp", "ep", "zero_stage")


def parse_overrides(overrides: list[str]):
    """Hydra's own parser (handles +key, ++key, quoting); ConfigError on a malformed override."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException as error:
        raise ConfigError(f"override {error}: write overrides as key=value, e.g. train.steps=100") from None


def override_value(overrides: list[str], key: str):
    """The value an override list gives ``key``, or None when it does not set it."""
    for parsed in parse_overrides(overrides):
        if parsed.key_or_group == key and not parsed.is_delete():
            return parsed.value()
    return None


def split_parallel(overrides: list[str]) -> tuple[dict, list[str]]:
    """Separate ``parallel.*`` overrides (returned as a dict) from the rest.

    ``plan`` reads the layout itself, so it can describe layouts (pp > 1, a pipeline schedule)
    that the trainer's schema does not accept yet."""
    layout, rest = {}, []
    for text, parsed in zip(overrides, parse_overrides(overrides)):
        key = parsed.key_or_group.lstrip("+")
        if key.startswith("parallel."):
            name, value = key[len("parallel."):], parsed.value()
            if name in PARALLEL_INT_KEYS and not isinstance(value, int):
                raise ConfigError(f"parallel.{name} ({value!r}) must be an integer >= 1")
            layout[name] = value
        else:
            rest.append(text)
    return layout, rest


def compose(overrides: list[str]) -> Config:
    """Compose ``configs/config.yaml`` with overrides into a validated :class:`Config`.

    ``run_dir`` is Hydra's run directory (``runs/<name>`` unless overridden), which is where the
    training processes will write: composing here must not need a running Hydra app."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    from dsv3_train.train import CONFIG_DIR

    register_configs()
    try:
        with _outside_running_app(), initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
            composed = hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
        with open_dict(composed):
            if OmegaConf.is_interpolation(composed, "run_dir"):  # ${hydra:runtime.output_dir}
                composed.run_dir = composed.hydra.run.dir
            del composed["hydra"]
        return to_config(composed)
    except (HydraException, OmegaConfBaseException) as error:
        detail = _one_line(error)
        if error.__cause__ is not None:
            detail += f" ({_one_line(error.__cause__)})"
        raise ConfigError(f"{detail} -- check the override's key and type "
                          f"(dsv3-train --cfg job prints the composed config)") from None


@contextlib.contextmanager
def _outside_running_app():
    """Let the compose API run inside a Hydra app (a sweep callback): park the app's GlobalHydra
    and put it back afterwards."""
    from hydra.core.global_hydra import GlobalHydra

    running = GlobalHydra.instance().hydra if GlobalHydra.instance().is_initialized() else None
    GlobalHydra.instance().clear()
    try:
        yield
    finally:
        if running is not None:
            GlobalHydra.instance().clear()
            GlobalHydra.instance().initialize(running)


def _one_line(error: BaseException) -> str:
    """Hydra/OmegaConf messages span lines and list search paths; keep what names the problem."""
    text = str(error).split("Config search path")[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(line for line in lines if not line.startswith(("full_key", "object_type", "reference_type")))
