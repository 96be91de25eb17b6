"""Config loading and validation on top of torchtune's config system.

torchtune gives the YAML + override semantics (``a.b=v``, ``~key``, ``node=dotted.Component``) and
``config.instantiate``; this module adds what it lacks: one function that loads a config with overrides
outside a recipe (for ``tune validate`` and the launcher's pre-flight check), a recursive component check
(torchtune's ``validate`` only looks at top-level nodes), and the contract keys of README "Configs".

Every problem is reported as :class:`ConfigError` with a one-line message, so the command line can
print it without a traceback.
"""

from __future__ import annotations

import inspect
import typing
from argparse import Namespace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException as OmegaConfBaseError


class ConfigError(ValueError):
    """A config that cannot be loaded, merged or instantiated; the message is one line."""


# README "Configs": keys users and tooling rely on. Value: accepted Python types after resolution.
_INT = (int,)
_NUM = (int, float)
_STR = (str,)
_BOOL = (bool,)
_NODE = (dict,)
CONTRACT_KEYS: dict[str, tuple[tuple[type, ...], bool]] = {
    # key: (types, may be null)
    "output_dir": (_STR, False),
    "seed": (_INT, False),
    "device": (_STR, False),
    "dtype": (_STR, False),
    "tokenizer.path": (_STR, False),
    "checkpointer.checkpoint_dir": (_STR, True),
    "dataset.path": (_STR, False),
    "seq_len": (_INT, False),
    "batch_size": (_INT, False),
    "gradient_accumulation_steps": (_INT, False),
    "max_steps": (_INT, True),
    "epochs": (_INT, False),
    "optimizer.lr": (_NUM, False),
    "lr_scheduler": (_NODE, False),
    "compile": (_BOOL, False),
    "cuda_graphs": (_BOOL, False),
    "resume_from_checkpoint": (_BOOL, False),
    "log_every_n_steps": (_INT, False),
    "save_every_n_steps": (_INT, False),
    "metric_logger": (_NODE, False),
}
POSITIVE_INT_KEYS = (
    "seq_len",
    "batch_size",
    "gradient_accumulation_steps",
    "epochs",
    "log_every_n_steps",
    "save_every_n_steps",
)
DTYPES = ("fp32", "bf16")


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Load a YAML config and apply command-line overrides with torchtune's semantics.

    Args:
        path: the YAML file.
        overrides: ``key=value``, ``~key`` (remove) and ``node=dotted.Component`` strings.

    Raises:
        ConfigError: missing/unreadable file, invalid YAML, a malformed or impossible override.
    """
    from torchtune.config._utils import _merge_yaml_and_cli_args

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        yaml_conf = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError, OmegaConf errors: report the first line only
        raise ConfigError(f"cannot read config {path}: {_first_line(exc)}") from None
    if not isinstance(yaml_conf, DictConfig):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    for arg in overrides:
        if arg.startswith("--"):
            raise ConfigError(f"unknown flag {arg!r}: overrides are key=value, ~key or node=dotted.Component")
        if not arg.startswith("~") and "=" not in arg:
            raise ConfigError(f"override {arg!r} must look like key=value (or ~key to remove a key)")
    try:
        return _merge_yaml_and_cli_args(
            Namespace(**OmegaConf.to_container(yaml_conf, resolve=False)), list(overrides)
        )
    except (ValueError, OmegaConfBaseError) as exc:
        raise ConfigError(f"bad override: {_first_line(exc)}") from None


def validate_config(cfg: DictConfig, *, contract: bool = True) -> None:
    """Check that every ``_component_`` node (at any depth) imports and accepts its keyword arguments,
    that primitive values match the annotated parameter types, and (``contract=True``) that the
    contract keys of README "Configs" are present with the right types.

    Components are not instantiated: nothing heavy runs. Arguments the recipe passes positionally
    (e.g. the model's parameters to the optimizer) may be missing from the YAML.

    Raises:
        ConfigError: naming every problem, joined on one line by ``; ``.
    """
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseError as exc:
        raise ConfigError(f"cannot resolve config: {_first_line(exc)}") from None
    errors: list[str] = []
    _check_components(resolved, "", errors)
    if contract:
        errors.extend(_check_contract(resolved))
    if errors:
        raise ConfigError("; ".join(errors))


def _check_components(node: Any, where: str, errors: list[str]) -> None:
    from torchtune.config._utils import _get_component_from_path

    if isinstance(node, list):
        for i, item in enumerate(node):
            _check_components(item, f"{where}[{i}]", errors)
        return
    if not isinstance(node, dict):
        return
    label = where or "<root>"
    if "_component_" in node:
        path = node["_component_"]
        try:
            component = _get_component_from_path(path)
        except Exception as exc:
            cause = exc.__cause__
            missing = getattr(cause, "name", None) if isinstance(cause, ModuleNotFoundError) else None
            if cause is None or (missing is not None and (path == missing or path.startswith(missing + "."))):
                errors.append(f"{label}: unknown component path {path!r}")
            else:  # the module exists but importing it failed: say why
                errors.append(f"{label}: cannot import component {path!r}: {type(cause).__name__}: {cause}")
            component = None
        if component is not None:
            kwargs = {k: v for k, v in node.items() if k != "_component_"}
            errors.extend(_check_signature(component, kwargs, label, path))
    for key, value in node.items():
        if key != "_component_":
            _check_components(value, f"{where}.{key}" if where else key, errors)


def _check_signature(component: Any, kwargs: dict[str, Any], label: str, path: str) -> list[str]:
    try:
        signature = inspect.signature(component)
    except (TypeError, ValueError):
        return []  # builtins without a signature: nothing to check
    try:
        signature.bind_partial(**kwargs)
    except TypeError as exc:
        return [f"{label}: {path} {exc}"]
    try:
        hints = typing.get_type_hints(component.__init__ if inspect.isclass(component) else component)
    except Exception:
        hints = {}
    errors = []
    for name, value in kwargs.items():
        expected = _primitive_types(hints.get(name))
        if expected is None or value is None and type(None) in expected:
            continue
        if isinstance(value, bool) and bool not in expected:
            ok = False
        else:
            ok = isinstance(value, expected) or (float in expected and isinstance(value, int))
        if not ok:
            names = "/".join(t.__name__ for t in expected if t is not type(None))
            errors.append(f"{label}.{name}: expected {names}, got {type(value).__name__} {value!r}")
    return errors


def _primitive_types(annotation: Any) -> tuple[type, ...] | None:
    """The accepted primitive types of an annotation, or None when it is not a plain primitive one."""
    if annotation in (int, float, str, bool):
        return (annotation,)
    args = typing.get_args(annotation)
    if (
        typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType", None))
        and args
    ):
        if all(a in (int, float, str, bool, type(None)) for a in args):
            return tuple(args)
    return None


NONFINITE_POLICIES = ("skip", "stop")


def _check_contract(resolved: dict[str, Any]) -> list[str]:
    errors = []
    for key, (types, nullable) in CONTRACT_KEYS.items():
        found, value = _get_dotted(resolved, key)
        if not found:
            errors.append(f"missing required key {key!r}")
            continue
        if value is None:
            if not nullable:
                errors.append(f"{key} must not be null")
            continue
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            names = "/".join(t.__name__ for t in types)
            errors.append(f"{key}: expected {names}, got {type(value).__name__} {value!r}")
    for key in POSITIVE_INT_KEYS:
        value = resolved.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value <= 0:
            errors.append(f"{key} must be positive, got {value}")
    if resolved.get("dtype") is not None and resolved.get("dtype") not in DTYPES:
        errors.append(f"dtype must be one of {DTYPES}, got {resolved.get('dtype')!r}")
    if resolved.get("on_nonfinite", "skip") not in NONFINITE_POLICIES:
        errors.append(
            f"on_nonfinite must be one of {NONFINITE_POLICIES}, got {resolved.get('on_nonfinite')!r}"
        )
    errors += _check_generation(resolved.get("generation") or {})
    errors += _check_quantize_base(resolved.get("finetune") or {})
    errors += _check_export(resolved.get("export") or {})
    from higgs_tune.data.capacities import CAPACITY_NAMES, check_capacity_values

    dataset = resolved.get("dataset") or {}
    try:  # the per-row capacities: numbers, "auto" or null
        check_capacity_values({name: dataset.get(f"{name}_capacity") for name in CAPACITY_NAMES})
    except ValueError as exc:
        errors.append(str(exc))
    fsdp = resolved.get("fsdp")
    if fsdp is not None:  # the optional FSDP2 options (torchrun runs): the fields of FSDPOptions
        from higgs_tune.training.parallelize import FSDPOptions

        if not isinstance(fsdp, dict):
            errors.append(f"fsdp: expected a mapping of FSDPOptions fields, got {fsdp!r}")
        else:
            signature_errors = _check_signature(FSDPOptions, fsdp, "fsdp", "FSDPOptions")
            errors += signature_errors
            try:
                if not signature_errors:
                    FSDPOptions(**fsdp)
            except ValueError as exc:
                errors.append(_first_line(exc))
            if fsdp.get("cpu_offload") and resolved.get("device") != "cuda":
                errors.append("fsdp.cpu_offload=true needs device=cuda (it offloads from GPU memory)")
    return errors


EXPORT_FORMATS = ("boson", "transformers")


def _check_export(export: dict[str, Any]) -> list[str]:
    """The optional ``export`` node: ``formats`` (a list of EXPORT_FORMATS, ``boson`` always written),
    ``audio_tokenizer`` (the transformers processor's audio tokenizer, a path or hub id)."""
    errors = []
    unknown = sorted(set(export) - {"formats", "audio_tokenizer"})
    if unknown:
        errors.append(f"export: unknown keys {unknown} (known: formats, audio_tokenizer)")
    formats = export.get("formats", ["boson"])
    if not isinstance(formats, list) or not set(formats) <= set(EXPORT_FORMATS) or "boson" not in formats:
        errors.append(f"export.formats must be a list of {EXPORT_FORMATS} including 'boson', got {formats!r}")
    if not isinstance(export.get("audio_tokenizer", ""), str):
        errors.append(f"export.audio_tokenizer: expected a path or hub id, got {export['audio_tokenizer']!r}")
    return errors


def _check_generation(generation: dict[str, Any]) -> list[str]:
    """The optional ``generation`` node: sampling options, period, batch size, audio decoder folder."""
    from higgs_tune.generation import SamplingConfig

    errors = []
    sampling = generation.get("sampling")
    if sampling is not None:
        if not isinstance(sampling, dict):
            errors.append(
                f"generation.sampling: expected a mapping of SamplingConfig fields, got {sampling!r}"
            )
        else:
            signature_errors = _check_signature(
                SamplingConfig, sampling, "generation.sampling", "SamplingConfig"
            )
            errors += signature_errors
            if not signature_errors:
                try:
                    SamplingConfig(**sampling)
                except ValueError as exc:
                    errors.append(f"generation.sampling: {_first_line(exc)}")
    for key in ("every_n_steps", "batch_size"):
        value = generation.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            errors.append(f"generation.{key} must be a positive int or null, got {value!r}")
    audio_decoder = generation.get("audio_decoder")
    if audio_decoder is not None:  # Boson's audio tokenizer folder (generated speech -> waveforms)
        if not isinstance(audio_decoder, str):
            errors.append(f"generation.audio_decoder: expected a folder path, got {audio_decoder!r}")
        else:
            missing = [
                name for name in ("config.json", "model.pth") if not (Path(audio_decoder) / name).is_file()
            ]
            if missing:
                errors.append(
                    f"generation.audio_decoder: no {' or '.join(missing)} in {audio_decoder} "
                    "(expected a local copy of bosonai/higgs-audio-v2-tokenizer)"
                )
    return errors


def _check_quantize_base(finetune: dict[str, Any]) -> list[str]:
    """The optional ``finetune.quantize_base`` node (QLoRA): NF4Options fields, LoRA mode only."""
    from higgs_tune.models.higgs_audio.qlora import NF4Options

    quantize = finetune.get("quantize_base")
    if quantize is None:
        return []
    errors = []
    if finetune.get("mode") != "lora" or finetune.get("lora") is None:
        errors.append("finetune.quantize_base (QLoRA) needs finetune.mode=lora and a finetune.lora node")
    if not isinstance(quantize, dict):
        return [*errors, f"finetune.quantize_base: expected a mapping of NF4Options fields, got {quantize!r}"]
    signature_errors = _check_signature(NF4Options, quantize, "finetune.quantize_base", "NF4Options")
    if not signature_errors:
        try:
            NF4Options(**quantize)
        except ValueError as exc:
            signature_errors.append(_first_line(exc))
    return errors + signature_errors


def _get_dotted(tree: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
