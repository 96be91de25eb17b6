"""The ``tune`` command of higgs_tune (README "The tune command").

torchtune's own ``tune run <path>`` imports a custom recipe as the module ``recipes.<name>`` after
appending the working directory to ``sys.path``; the torchtune wheel installs a top-level package
``recipes`` of its own, which wins, so ``tune run recipes/higgs_finetune`` fails single-process unless
the user sets ``PYTHONPATH``. This front end runs recipes BY PATH instead, the way ``python recipe.py``
would (the recipe's folder first on ``sys.path``), in-process for a single process and through
torchrun's ``torch.distributed.run`` for ``--nproc_per_node`` & co. It also lists (``ls``), copies
(``cp``) and checks (``validate``) this project's recipes and configs, and hands every other command
(``download``, torchtune's built-in recipes, ...) to torchtune's CLI unchanged.

Usage::

    tune run [torchrun options] [--verbose] RECIPE --config CONFIG [key=value | ~key | node=dotted.Component ...]
    tune ls
    tune cp NAME DESTINATION
    tune validate CONFIG [overrides ...]

RECIPE is a path (``recipes/higgs_finetune``; ``.py`` may be left out) or a registered name
(``higgs_finetune``). CONFIG is a path or a registered name (``cpu_tiny``). Before any process starts,
``run`` loads the config with its overrides and, for recipes that validate their config with
``higgs_tune.config.validate_config`` (this project's and copies of it), runs that validation: a config
error is one line, also with ``--nproc_per_node``.
"""

from __future__ import annotations

import argparse
import ast
import os
import runpy
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from higgs_tune.config import ConfigError, load_config, validate_config
from higgs_tune.errors import TRACEBACK_ENV, UserInputError, tracebacks_requested

PROG = "tune"


class CLIError(Exception):
    """A usage problem reported as one line: ``tune: error: <message>``, exit status 2."""


@dataclass(frozen=True)
class Registry:
    """This project's recipes and configs, found next to the installed (editable) package."""

    root: Path

    @property
    def recipes_dir(self) -> Path:
        return self.root / "recipes"

    @property
    def configs_dir(self) -> Path:
        return self.root / "configs"

    def recipes(self) -> dict[str, Path]:
        if not self.recipes_dir.is_dir():
            return {}
        return {p.stem: p for p in sorted(self.recipes_dir.glob("*.py")) if not p.name.startswith("_")}

    def configs(self) -> dict[str, Path]:
        if not self.configs_dir.is_dir():
            return {}
        return {p.stem: p for p in sorted(self.configs_dir.glob("*.yaml"))}


def default_registry() -> Registry:
    import higgs_tune

    return Registry(Path(higgs_tune.__file__).resolve().parent.parent)


def resolve_recipe(recipe: str, registry: Registry) -> Path | None:
    """A recipe path (with or without ``.py``) or a registered name -> the file; None if neither."""
    for candidate in (Path(recipe), Path(recipe + ".py")):
        if candidate.is_file():
            return candidate.resolve()
    return registry.recipes().get(recipe)


def resolve_config(config: str, registry: Registry) -> Path:
    for candidate in (Path(config), Path(config + ".yaml")):
        if candidate.is_file():
            return candidate.resolve()
    if config in registry.configs():
        return registry.configs()[config]
    raise CLIError(
        f"config not found: {config} (not a file, and not one of: {', '.join(registry.configs())})"
    )


# ------------------------------------------------------------------------------------------ run
def _torchrun_parser() -> argparse.ArgumentParser:
    """torchrun's own argument parser, with its script arguments renamed to recipe/recipe_args."""
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    parser.prog = f"{PROG} run"
    for action in parser._actions:
        if action.dest == "training_script":
            action.dest = "recipe"
            action.help = "recipe path (recipes/higgs_finetune) or name (see `tune ls`)"
        elif action.dest == "training_script_args":
            action.dest = "recipe_args"
            action.help = "--config CONFIG followed by overrides key=value, ~key, node=dotted.Component"
    return parser


def _split_run_argv(argv: list[str]) -> tuple[list[str], str, list[str]]:
    """Split ``[torchrun options] RECIPE [recipe args]`` without guessing: parse with torchrun's parser."""
    args = _torchrun_parser().parse_args(argv)
    recipe_index = len(argv) - len(args.recipe_args) - 1
    return argv[:recipe_index], args.recipe, list(args.recipe_args)


def _config_from_recipe_args(recipe_args: list[str]) -> tuple[int, str]:
    if "--config" not in recipe_args:
        raise CLIError("the '--config CONFIG' argument is required after the recipe")
    index = recipe_args.index("--config") + 1
    if index >= len(recipe_args):
        raise CLIError("'--config' needs a value")
    return index, recipe_args[index]


def cmd_run(argv: list[str], registry: Registry) -> int:
    if "--verbose" in argv:  # neither a torchrun option nor an override: unambiguous anywhere
        # Data, checkpoint and tokenizer errors (higgs_tune.errors) then show their traceback, in every
        # process (torchrun's workers inherit the environment).
        argv = [arg for arg in argv if arg != "--verbose"]
        os.environ[TRACEBACK_ENV] = "1"
    torchrun_argv, recipe, recipe_args = _split_run_argv(argv)
    recipe_path = resolve_recipe(recipe, registry)
    if recipe_path is None:
        if _is_torchtune_recipe(recipe):
            return _delegate_to_torchtune(["run", *argv])
        raise CLIError(
            f"recipe not found: {recipe} (not a file, and not one of: {', '.join(registry.recipes())})"
        )

    config_index, config = _config_from_recipe_args(recipe_args)
    config_path = resolve_config(config, registry)
    recipe_args = [*recipe_args]
    recipe_args[config_index] = str(config_path)
    overrides = recipe_args[config_index + 1 :] + recipe_args[: config_index - 1]
    # Pre-flight, before any process starts: the config loads and every override applies; for a recipe
    # that validates its config with higgs_tune.config.validate_config (ours and copies of it), that
    # validation too, so an error is one line instead of a traceback per rank.
    cfg = load_config(config_path, overrides)
    if _recipe_validates_its_config(recipe_path):
        validate_config(cfg)

    if torchrun_argv:
        return _run_distributed(torchrun_argv, recipe_path, recipe_args)
    return _run_single_process(recipe_path, recipe_args)


def _recipe_validates_its_config(recipe_path: Path) -> bool:
    """Whether the recipe file imports ``validate_config`` from ``higgs_tune.config`` (read, not run)."""
    try:
        tree = ast.parse(recipe_path.read_text(), filename=str(recipe_path))
    except (OSError, SyntaxError, ValueError):
        return False  # running it will report the problem
    return any(
        isinstance(node, ast.ImportFrom)
        and node.module == "higgs_tune.config"
        and any(alias.name == "validate_config" for alias in node.names)
        for node in ast.walk(tree)
    )


def _run_single_process(recipe_path: Path, recipe_args: list[str]) -> int:
    sys.argv = [str(recipe_path), *recipe_args]
    sys.path.insert(0, str(recipe_path.parent))  # as `python recipes/x.py` would
    try:
        runpy.run_path(str(recipe_path), run_name="__main__")
    except SystemExit as exc:
        return _exit_code(exc.code)
    return 0


def _run_distributed(torchrun_argv: list[str], recipe_path: Path, recipe_args: list[str]) -> int:
    from torch.distributed.run import run

    args = _torchrun_parser().parse_args([*torchrun_argv, str(recipe_path), *recipe_args])
    args.training_script, args.training_script_args = args.recipe, args.recipe_args
    args.module = False  # run the file as a script (`python recipes/x.py`), never `python -m recipes.x`
    if not args.rdzv_endpoint:
        args.standalone = True  # one machine: pick a free port, several jobs may run side by side
    run(args)
    return 0


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


# ------------------------------------------------------------------------------------------ ls / cp
def cmd_ls(args: argparse.Namespace, registry: Registry) -> int:
    recipes, configs = registry.recipes(), registry.configs()
    if not recipes:
        raise CLIError(
            f"no recipes found under {registry.recipes_dir} (install the project with `pip install -e .`)"
        )
    width = max(len(name) for name in recipes) + 2
    print(f"{'RECIPE':<{width}}CONFIG")
    for name in recipes:
        print(f"{name:<{width}}{', '.join(configs) if configs else '-'}")
    print(f"\nrecipes: {registry.recipes_dir}\nconfigs: {registry.configs_dir}")
    print("torchtune's built-in recipes: `tune ls --torchtune`")
    return 0


def cmd_cp(args: argparse.Namespace, registry: Registry) -> int:
    source = registry.recipes().get(args.name) or registry.configs().get(args.name)
    if source is None:
        as_path = Path(args.name)
        for candidate in (as_path, Path(args.name + ".py"), Path(args.name + ".yaml")):
            if candidate.is_file():
                source = candidate
                break
    if source is None:
        if _is_torchtune_recipe(args.name) or _is_torchtune_config(args.name):
            return _delegate_to_torchtune(["cp", args.name, args.destination])
        known = ", ".join([*registry.recipes(), *registry.configs()])
        raise CLIError(f"nothing named {args.name!r} to copy (known: {known})")
    destination = Path(args.destination)
    if destination.is_dir():
        destination = destination / source.name
    elif not destination.suffix:
        destination = destination.with_suffix(source.suffix)
    if destination.exists():
        raise CLIError(f"{destination} already exists; not overwriting it")
    if not destination.parent.is_dir():
        if not args.make_parents:
            raise CLIError(f"folder {destination.parent} does not exist (use --make-parents)")
        destination.parent.mkdir(parents=True)
    shutil.copyfile(source, destination)
    print(f"Copied {source} to {destination}")
    return 0


# ------------------------------------------------------------------------------------------ validate
def cmd_validate(args: argparse.Namespace, registry: Registry) -> int:
    config_path = resolve_config(args.config, registry)
    cfg = load_config(config_path, args.overrides)
    validate_config(cfg)
    print(f"Config is well-formed: {config_path}")
    return 0


# ------------------------------------------------------------------------------------------ torchtune
def _torchtune_names() -> tuple[set[str], set[str]]:
    from torchtune._recipe_registry import get_all_recipes

    recipes, configs = set(), set()
    for recipe in get_all_recipes():
        recipes.add(recipe.name)
        configs.update(c.name for c in recipe.configs)
    return recipes, configs


def _is_torchtune_recipe(name: str) -> bool:
    return name in _torchtune_names()[0]


def _is_torchtune_config(name: str) -> bool:
    return name in _torchtune_names()[1]


def _delegate_to_torchtune(argv: list[str]) -> int:
    from torchtune._cli.tune import main as torchtune_main

    sys.argv = [PROG, *argv]
    try:
        torchtune_main()
    except SystemExit as exc:
        return _exit_code(exc.code)
    return 0


# ------------------------------------------------------------------------------------------ main
OWN_COMMANDS = ("run", "ls", "cp", "validate")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="higgs_tune: fine-tune Higgs Audio v2. Commands not listed here go to torchtune's CLI.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{run,ls,cp,validate,download,cat}")
    sub.add_parser("run", help="run a recipe (see `tune run --help`)", add_help=False)
    ls = sub.add_parser("ls", help="list this project's recipes and configs")
    ls.add_argument("--torchtune", action="store_true", help="list torchtune's built-in recipes instead")
    cp = sub.add_parser("cp", help="copy a recipe or config to modify it")
    cp.add_argument("name", help="recipe or config name (or path)")
    cp.add_argument("destination", help="file or existing folder")
    cp.add_argument("--make-parents", action="store_true", help="create missing parent folders")
    validate = sub.add_parser(
        "validate", help="check a config (components, keyword arguments, contract keys)"
    )
    validate.add_argument("config", help="config path or name")
    validate.add_argument("overrides", nargs="*", help="key=value, ~key, node=dotted.Component")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    registry = default_registry()
    try:
        if argv and argv[0] == "run":
            if len(argv) == 1 or argv[1] in ("-h", "--help"):
                _torchrun_parser().print_help()
                return 0
            return cmd_run(argv[1:], registry)
        if argv and argv[0] not in OWN_COMMANDS and not argv[0].startswith("-"):
            return _delegate_to_torchtune(argv)
        args = _parser().parse_args(argv)
        if args.command is None:
            _parser().print_help()
            return 0
        if args.command == "ls" and args.torchtune:
            return _delegate_to_torchtune(["ls"])
        return {"ls": cmd_ls, "cp": cmd_cp, "validate": cmd_validate}[args.command](args, registry)
    except (CLIError, ConfigError, UserInputError) as exc:
        if isinstance(exc, UserInputError) and tracebacks_requested():
            raise
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
