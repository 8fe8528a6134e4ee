"""`medsam-engine config show|reference`: the configuration a run would use, and the reference of every key
and environment variable.

``show``: the defaults, then ``--config FILE`` over them, printed as YAML (``--json``: JSON) that
``--config`` reads back to the same configuration; a file that does not load is exit 2 with one line saying
why. ``reference``: the Markdown of pipeline/annotate/config_reference.py (docs/configuration.md is its
output).
"""

from __future__ import annotations

import json
import sys

import yaml
from pydantic import ValidationError

from medsam_engine.pipeline.annotate.config import EngineConfig, load_config
from medsam_engine.pipeline.annotate.config_reference import plain, render_reference
from medsam_engine.pipeline.cli.common import EXIT_OK, EXIT_USAGE, add_command, validation_summary


def add_parsers(sub) -> None:
    """`config show` and `config reference`."""
    group = add_command(sub, "config", "the effective configuration, and the reference of every setting")
    actions = group.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = add_command(actions, "show", "print the effective configuration: the defaults, then FILE")
    show.add_argument(
        "--config", default=None, metavar="FILE", help="YAML or JSON configuration applied over the defaults"
    )
    show.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    add_command(
        actions,
        "reference",
        "print the Markdown reference of every key and environment variable (docs/configuration.md)",
    )


def config_command(args) -> int:
    if args.config_command == "reference":
        sys.stdout.write(render_reference())
        return EXIT_OK
    config, problem = _load(args.config)
    if config is None:
        print(f"medsam-engine config show: bad configuration: {problem}", file=sys.stderr)
        return EXIT_USAGE
    sys.stdout.write(config_text(config, as_json=args.json))
    return EXIT_OK


def config_text(config: EngineConfig, *, as_json: bool = False) -> str:
    """Every key of ``config`` as YAML in the models' order (label values as integer keys), or as JSON
    (keys as strings, as JSON has them); ``--config`` reads either back to ``config``."""
    if as_json:
        return json.dumps(config.model_dump(mode="json"), indent=1) + "\n"
    return yaml.dump(plain(config), Dumper=_Dumper, sort_keys=False, allow_unicode=True)


class _Dumper(yaml.SafeDumper):
    """YAML in block style, except lists of plain values (windows, colours) on one line: ``[40.0, 400.0]``."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flat = not any(isinstance(item, (dict, list)) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flat)


_Dumper.add_representer(list, _represent_list)


def _load(path: str | None) -> tuple[EngineConfig | None, str]:
    """(the configuration of ``path``, "") or (None, why it does not load, in one line)."""
    try:
        return load_config(path), ""
    except ValidationError as exc:
        return None, validation_summary(exc)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        return None, f"{path} is not YAML or JSON ({getattr(exc, 'problem', None) or 'unreadable'}{where})"
    except OSError as exc:
        return None, f"cannot read {path}: {exc.strerror or exc}"
    except ValueError as exc:
        return None, f"{path}: {' '.join(str(exc).split())}"
