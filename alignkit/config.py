"""Typed recipe config: YAML + `--set` overrides, validated in one place, one clear error per mistake.

A recipe is

    model:   {base, quantization, compute_dtype, ...}   -> alignkit.modeling.ModelSettings
    peft:    {method, r, lora_alpha, ...}                -> alignkit.modeling.PeftSettings
    run_dir: runs/my-run          # relative paths resolve against the YAML file's directory
                                  # (against the current directory when given with --set)
    seed:    0
    stages:
      - {name: sft, kind: sft, data: {...}, train: {...}}
      - {name: dpo, kind: dpo, after: sft, data: {...}, train: {...}}

`train:` keys are the fields of the stage kind's TRL config (SFTConfig,
DPOConfig, ...) and pass straight through; `data:` keys, and which stages
`after:` and `reward:` may name, are what the kind declares (alignkit.stage.StageKind),
read from the recipes the runner passes in as `stage_kinds`. Errors name the file, the line and the dotted key (or the `--set`
that gave the value), and suggest the key that was probably meant.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from alignkit.data.keys import PATH_KEYS, both_set, missing_companions, value_problems
from alignkit.errors import UserError
from alignkit.modeling import DTYPES, PEFT_METHODS, QUANTIZATIONS, TINY_SPEC, ModelSettings, PeftSettings, liger_available
from alignkit.stage import MANAGED_TRAIN_KEYS, StageKind, StageRecipe
from alignkit.tracking import LogCompletions, parse_log_completions, parse_report_to, require_packages

TOP_LEVEL_KEYS = {"description", "model", "peft", "run_dir", "seed", "report_to", "stages", "loop"}
STAGE_KEYS = {"name", "kind", "after", "reward", "data", "train", "report_to"}
# Stage fields that name another stage: the runner orders by them and passes them to the recipe as parents.
STAGE_REFERENCES = ("after", "reward")


@dataclass
class StageConfig:
    name: str
    kind: str
    data: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    after: str | None = None
    reward: str | None = None
    more_rewards: tuple[str, ...] = ()  # `reward:` as a list (an ensemble, PPO): the members after the first
    report_to: tuple[str, ...] | None = None  # alignkit.tracking.TRACKERS; None: the recipe's top-level report_to
    log_completions: LogCompletions | None = None  # train.log_completions, kept out of `train` (and the hash)
    round: int | None = None  # the loop round of a stage the loop adds (round-N/...); never set from YAML

    def references(self) -> dict[str, str]:
        refs = {role: getattr(self, role) for role in STAGE_REFERENCES if getattr(self, role)}
        refs.update({f"reward_{k}": name for k, name in enumerate(self.more_rewards, 1)})
        return refs


@dataclass
class LoopSettings:
    """The `loop:` section: rounds of labels from the latest policy (`alignkit loop`, recipes/loop.py)."""

    prompts: str  # the prompt pool: JSONL of `prompt` (or `messages`) rows, sampled from every round
    labels_db: str  # the label store the rounds' pairs go to and their votes come from
    start: str  # the recipe stage round 0 samples from (e.g. sft)
    stages: list[str]  # the recipe stages retrained each round: reward stages and one policy stage (dpo, ppo, ...)
    rounds: int = 3
    candidates: int = 4  # responses sampled per prompt; any two of them may become the prompt's pair
    budget: int = 100  # pairs sent to people per round, at most one per prompt
    overlap: int = 1  # votes a comparison needs (the labeling server's --overlap)
    min_votes: float = 1.0  # share of a round's comparisons that must have their votes before it trains
    select: Literal["uncertainty", "random"] = "uncertainty"  # round 0 is random: no reward model exists yet
    rule: Literal["disagreement", "margin", "bald"] = "disagreement"  # alignkit.selection's uncertainty rules
    ensemble: int = 3  # reward models per round, each on its own bootstrap resample of the votes
    reward_votes: Literal["all", "round"] = "all"  # reward stages train on every round's votes, or the round's own
    policy_votes: Literal["all", "round"] = "round"  # the policy stage (from the previous round's) likewise
    max_new_tokens: int = 48
    temperature: float = 1.0  # sampling for candidates and comparisons (1: KL to the reference is measurable)
    eval_prompts: str | None = None  # prompts each round's policy is compared on (default: the pool)
    judge: str | None = None  # a compare judge (default: reward:<the round's first reward model>)


@dataclass
class RecipeConfig:
    path: Path
    model: ModelSettings
    peft: PeftSettings
    run_dir: Path
    seed: int
    stages: list[StageConfig]
    description: str = ""
    raw: dict = field(default_factory=dict)  # the resolved YAML, for stage.json
    where: Any = None  # _Where: a dotted key -> "FILE:LINE" or "--set ...", for errors found after loading
    loop: LoopSettings | None = None

    def stage(self, name: str) -> StageConfig:
        for s in self.stages:
            if s.name == name:
                return s
        raise UserError(f"{self.path}: no stage named {name!r}{_suggest(name, [s.name for s in self.stages])}")


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Lines:
    """Line numbers of every key in the YAML, by dotted path (stages addressed by name)."""

    def __init__(self, text: str):
        self.lines: dict[str, int] = {}
        self.duplicates: list[tuple[str, int, int]] = []  # (dotted key, first line, repeated line)
        try:
            node = yaml.compose(text)
        except yaml.YAMLError:
            return
        if node is not None:
            self._walk(node, "")

    def _walk(self, node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for k, v in node.value:
                key = f"{prefix}.{k.value}" if prefix else str(k.value)
                if key in seen:  # PyYAML keeps the last silently; a recipe that says two things is refused
                    self.duplicates.append((key, seen[key], k.start_mark.line + 1))
                seen[key] = k.start_mark.line + 1
                self.lines[key] = k.start_mark.line + 1
                self._walk(v, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                name = None
                if isinstance(item, yaml.MappingNode):
                    name = next((v.value for k, v in item.value if k.value == "name"), None)
                key = f"{prefix}.{name if name is not None else i}"
                self.lines[key] = item.start_mark.line + 1
                self._walk(item, key)

    def where(self, path: Path, dotted: str) -> str:
        # Fall back to the nearest enclosing key that has a line.
        probe = dotted
        while probe:
            if probe in self.lines:
                return f"{path}:{self.lines[probe]}"
            probe = probe.rpartition(".")[0]
        return str(path)


class _Where:
    """Where a dotted key's value came from: the `--set` that gave it (or an enclosing key), else its YAML line."""

    def __init__(self, path: Path, lines: _Lines, overrides: dict[str, str]):
        self.path, self.lines, self.overrides = path, lines, overrides

    def override(self, dotted: str) -> str | None:
        probe = dotted
        while probe:
            if probe in self.overrides:
                return self.overrides[probe]
            probe = probe.rpartition(".")[0]
        return None

    def __call__(self, dotted: str) -> str:
        item = self.override(dotted)
        return f"--set {item}" if item is not None else self.lines.where(self.path, dotted)

    def base_dir(self, dotted: str) -> Path:
        # A path typed on the command line means what the shell means: relative to the current directory.
        return Path.cwd() if self.override(dotted) is not None else self.path.resolve().parent


def _unshare(obj: Any) -> Any:
    """A copy with no shared nodes: YAML anchors/aliases (`train: *defaults`) would otherwise let
    `--set stages.dpo.train.x=…` change every stage that uses the anchor (copy.deepcopy keeps sharing)."""
    if isinstance(obj, dict):
        return {k: _unshare(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unshare(v) for v in obj]
    return obj


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. stages.dpo.train.beta=0.2")
    key, _, value = item.partition("=")
    keys = key.strip().split(".")
    if not all(keys):
        raise UserError(f"--set {item!r}: {key.strip()!r} is not a dotted key, e.g. stages.dpo.train.beta=0.2")
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    return keys, parsed


def apply_override(raw: dict, item: str) -> str:
    """Set one dotted key; `stages.<name>.…` addresses a stage by its name. Returns the dotted key set."""
    keys, value = _parse_override(item)
    node: Any = raw
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            match = [s for s in node if isinstance(s, dict) and s.get("name") == key]
            if not match:
                names = [s.get("name") for s in node if isinstance(s, dict)]
                raise UserError(f"--set {item}: no stage named {key!r}{_suggest(key, names)}")
            if last:
                raise UserError(f"--set {item}: cannot replace a whole stage; set one of its keys")
            node = match[0]
            continue
        if not isinstance(node, dict):
            raise UserError(f"--set {item}: {'.'.join(keys[:i])} is not a mapping")
        if last:
            node[key] = value
        else:
            if node.get(key) is None:  # `train:` left empty in the YAML is an empty mapping to set keys in
                node[key] = {}
            node = node[key]
    return ".".join(keys)


def _coerce(value: Any, annotation: Any) -> Any:
    """A value made to fit its field the way TRL would take it; unchanged when nothing fits (the check reports it).

    YAML 1.1 reads `1e-4` (no dot) as a string: accepted where a float is expected. A plain string where a
    list of strings is expected becomes a one-item list, as TRL's DPOConfig does for `loss_type: sigmoid`
    and HfArgumentParser does for one value on the command line.
    """
    if _check_type(value, annotation):
        return value
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(annotation):
            coerced = _coerce(value, arm)
            if _check_type(coerced, arm):
                return coerced
        return value
    if annotation is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if origin is list and typing.get_args(annotation):
        (item,) = typing.get_args(annotation)
        if isinstance(value, str) and _check_type(value, item):
            return [value]
        if isinstance(value, list):
            return [_coerce(v, item) for v in value]
    return value


def _check_type(value: Any, annotation: Any) -> bool:
    """Loose check of a YAML value against a dataclass field annotation (int accepted for float)."""
    if annotation is Any or annotation is None:
        return True
    if isinstance(annotation, str):
        annotation = {"int": int, "float": float, "bool": bool, "str": str}.get(annotation.split("|")[0].strip(), Any)
        if annotation is Any:
            return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_check_type(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is Literal:
        return value in typing.get_args(annotation)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin is list:
        args = typing.get_args(annotation)
        return isinstance(value, list) and (not args or all(_check_type(v, args[0]) for v in value))
    if origin is tuple:
        return isinstance(value, (list, tuple))
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    return True


def _type_name(annotation: Any) -> str:
    """`list[str] | None`, `int` — an annotation as a user reads it (not `<class 'int'>`)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = typing.get_args(annotation)
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(_type_name(a) for a in args)}]" if args else name
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _mapping(value: Any, dotted: str, where: _Where) -> dict:
    """A section that must be a `key: value` mapping (absent or empty means {})."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        hint = " (e.g. data: {train: my.jsonl})" if dotted.endswith(".data") and isinstance(value, str) else ""
        raise UserError(f"{where(dotted)}: {dotted} must be a mapping of keys to values, "
                        f"got {type(value).__name__} {_shown(value)}{hint}")
    return dict(value)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _build_dataclass(cls, values: dict, *, section: str, where: _Where):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {k: _coerce(v, hints.get(k, Any)) for k, v in values.items()}
    for key, value in values.items():
        if key not in fields:
            raise UserError(f"{where(f'{section}.{key}')}: unknown key {section}.{key}{_suggest(key, fields)}")
        if not _check_type(value, hints.get(key, Any)):
            raise UserError(f"{where(f'{section}.{key}')}: {section}.{key}={value!r} is not a valid {_type_name(hints.get(key))}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise UserError(f"{where(section)}: {section}: {err}") from None


def _resolve_path(value: Any, base_dir: Path) -> Any:
    """Relative paths resolve against base_dir; URLs and non-strings pass through."""
    if not isinstance(value, str) or "://" in value or value.startswith("hf:"):
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base_dir / p).resolve())


def _resolve_model_base(base: Any, base_dir: Path) -> Any:
    """model.base: a path when it looks like one (./, /, ~) or names an existing directory under base_dir;
    otherwise a hub id. `models/x` and `org/name` read alike, so existence decides."""
    if not isinstance(base, str) or base == TINY_SPEC or "://" in base:
        return base
    if base.startswith((".", "/", "~")):
        return _resolve_path(base, base_dir)
    candidate = base_dir / base
    return str(candidate.resolve()) if candidate.exists() else base


def load_recipe(path: str | Path, overrides: list[str] | None = None, *,
                stage_kinds: Mapping[str, StageRecipe] | None = None) -> RecipeConfig:
    """Load, override and validate a recipe. `stage_kinds` maps kind -> its recipe (the runner's table),
    whose KIND declarations say which train and data keys, and which parents, each kind takes."""
    path = Path(path)
    raw, lines = _read_yaml(path)
    set_by: dict[str, str] = {}
    for item in overrides or []:
        set_by[apply_override(raw, item)] = item
    where = _Where(path, lines, set_by)

    for key in raw:
        if key not in TOP_LEVEL_KEYS:
            raise UserError(f"{where(str(key))}: unknown key {key}{_suggest(key, TOP_LEVEL_KEYS)}")
    for key in ("model", "stages"):
        if key not in raw:
            raise UserError(f"{path}: missing required key {key!r}")
    description = raw.get("description") or ""
    if not isinstance(description, str):
        raise UserError(f"{where('description')}: description must be text")
    model = _model_settings(raw, where)
    peft = _peft_settings(raw, model, where)
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise UserError(f"{where('seed')}: seed={seed!r} is not an integer")
    run_dir_raw = raw.get("run_dir") or f"runs/{path.stem}"
    if not isinstance(run_dir_raw, str):
        raise UserError(f"{where('run_dir')}: run_dir={run_dir_raw!r} is not a path")
    run_dir = Path(_resolve_path(run_dir_raw, where.base_dir("run_dir")))

    stages_raw = raw["stages"]
    if not isinstance(stages_raw, list) or not stages_raw:
        raise UserError(f"{where('stages')}: stages must be a non-empty list")
    stages = [_stage_config(i, s, where, stage_kinds) for i, s in enumerate(stages_raw)]
    report_to = parse_report_to(raw.get("report_to", "tensorboard"), "report_to", where)
    for s in stages:
        require_packages(s.report_to or report_to, where("report_to" if s.report_to is None else f"stages.{s.name}.report_to"))
        s.report_to = report_to if s.report_to is None else s.report_to
    _check_references(stages, where)
    if stage_kinds is not None:
        _check_stage_roles(stages, stage_kinds, where)
    _check_peft_limits(peft, stages, where, stage_kinds)
    return RecipeConfig(path=path, model=model, peft=peft, run_dir=run_dir, seed=seed, stages=stages,
                        description=description, raw=raw, where=where, loop=_loop_settings(raw, stages, where))


def _loop_settings(raw: dict, stages: list[StageConfig], where: _Where) -> LoopSettings | None:
    """The loop: section, typed, with its paths resolved and the stages it names checked against the recipe."""
    if "loop" not in raw:
        return None
    loop_raw = _mapping(raw["loop"], "loop", where)
    for key in ("prompts", "labels_db", "start", "stages"):
        if key not in loop_raw:
            raise UserError(f"{where('loop')}: loop.{key} is required")
    for key in ("prompts", "labels_db", "eval_prompts"):
        if key in loop_raw:
            loop_raw[key] = _resolve_path(loop_raw[key], where.base_dir(f"loop.{key}"))
    loop = _build_dataclass(LoopSettings, loop_raw, section="loop", where=where)
    names = [s.name for s in stages]
    for key, value in (("start", loop.start), *(("stages", v) for v in loop.stages)):
        if value not in names:
            raise UserError(f"{where(f'loop.{key}')}: loop.{key} names {value!r}, which is not a stage of this "
                            f"recipe{_suggest(str(value), names)}")
    for key, value, ok, must in (
        ("rounds", loop.rounds, loop.rounds >= 1, ">= 1"), ("candidates", loop.candidates, loop.candidates >= 2, ">= 2"),
        ("budget", loop.budget, loop.budget >= 1, ">= 1"), ("overlap", loop.overlap, loop.overlap >= 1, ">= 1"),
        ("min_votes", loop.min_votes, 0 < loop.min_votes <= 1, "in (0, 1]"),
        ("ensemble", loop.ensemble, loop.ensemble >= (2 if loop.select == "uncertainty" else 1),
         ">= 2 with select: uncertainty (one reward model cannot disagree with itself)" if loop.select == "uncertainty"
         else ">= 1"),
        ("max_new_tokens", loop.max_new_tokens, loop.max_new_tokens >= 1, ">= 1"),
        ("temperature", loop.temperature, loop.temperature > 0, "> 0 (candidates must differ)"),
    ):
        if not ok:
            raise UserError(f"{where(f'loop.{key}')}: loop.{key}={value!r} must be {must}")
    return loop


def _read_yaml(path: Path) -> tuple[dict, _Lines]:
    """The recipe's mapping (with no shared nodes) and the line of every key; refuses duplicate keys."""
    if not path.exists():
        raise UserError(f"config file not found: {path}")
    if path.is_dir():
        raise UserError(f"{path} is a directory, expected a recipe YAML file (e.g. recipes/configs/tiny_sft_dpo.yaml)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8; save the recipe as UTF-8") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read the recipe: {err.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{at}: invalid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe must be a YAML mapping with model, peft, run_dir and stages")
    lines = _Lines(text)
    if lines.duplicates:
        key, first, again = lines.duplicates[0]
        raise UserError(f"{path}:{again}: duplicate key {key} (first on line {first}); YAML would keep only the last")
    return _unshare(raw), lines


def _model_settings(raw: dict, where: _Where) -> ModelSettings:
    model_raw = _mapping(raw.get("model"), "model", where)
    if "base" not in model_raw:
        raise UserError(f"{where('model')}: model.base is required (hub id, local dir or alignkit-tiny)")
    model_raw["base"] = _resolve_model_base(model_raw["base"], where.base_dir("model.base"))
    model = _build_dataclass(ModelSettings, model_raw, section="model", where=where)
    for key, value, allowed in (
        ("model.quantization", model.quantization, QUANTIZATIONS),
        ("model.compute_dtype", model.compute_dtype, DTYPES),
        ("model.dtype", model.dtype, DTYPES),
    ):
        if value not in allowed:
            raise UserError(f"{where(key)}: {key}={value!r}; one of {', '.join(allowed)}{_suggest(value, allowed)}")
    return model


def _peft_settings(raw: dict, model: ModelSettings, where: _Where) -> PeftSettings:
    peft = _build_dataclass(PeftSettings, _mapping(raw.get("peft"), "peft", where), section="peft", where=where)
    if peft.method not in PEFT_METHODS:
        raise UserError(f"{where('peft.method')}: peft.method={peft.method!r}; one of {', '.join(PEFT_METHODS)}{_suggest(peft.method, PEFT_METHODS)}")
    if peft.method == "full" and model.quantization != "none":
        raise UserError(f"{where('peft.method')}: full fine-tuning needs model.quantization: none")
    for key, ok, rule in (("r", peft.r >= 1, ">= 1"), ("lora_alpha", peft.lora_alpha > 0, "> 0"),
                          ("lora_dropout", 0 <= peft.lora_dropout < 1, "in [0, 1)"),
                          ("num_virtual_tokens", peft.num_virtual_tokens >= 1, ">= 1")):
        if not ok:  # PEFT / torch would refuse it only once the model is loaded, after earlier stages trained
            raise UserError(f"{where(f'peft.{key}')}: peft.{key}={getattr(peft, key)!r} must be {rule}")
    return peft


def _stage_config(i: int, s: Any, where: _Where, stage_kinds: Mapping[str, StageRecipe] | None) -> StageConfig:
    """One entry of `stages:`, its keys checked against its kind's declaration and its paths resolved."""
    if not isinstance(s, dict):
        raise UserError(f"{where(f'stages.{i}')}: each stage must be a mapping")
    sname = s.get("name")
    where_key = f"stages.{sname if sname is not None else i}"
    if not isinstance(sname, str) or not sname or "/" in sname or sname.startswith("."):
        raise UserError(f"{where(where_key)}: stage {i} needs a name (a plain directory name)")
    for key in s:
        if key not in STAGE_KEYS:
            raise UserError(f"{where(f'{where_key}.{key}')}: unknown key {where_key}.{key}{_suggest(key, STAGE_KEYS)}")
    kind_name = s.get("kind")
    if stage_kinds is not None and (not isinstance(kind_name, str) or kind_name not in stage_kinds):
        raise UserError(f"{where(f'{where_key}.kind')}: {where_key}.kind={kind_name!r}; one of {', '.join(stage_kinds)}{_suggest(kind_name, stage_kinds)}")
    for role in STAGE_REFERENCES:
        value = s.get(role)
        if role == "reward" and isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            continue  # an ensemble of reward stages
        if value is not None and not isinstance(value, str):
            also = " (or, for an ensemble, a list of reward stage names)" if role == "reward" else ""
            raise UserError(f"{where(f'{where_key}.{role}')}: {where_key}.{role}={value!r} must be a stage name{also}")
    rewards = s.get("reward")
    reward, more_rewards = (rewards[0], tuple(rewards[1:])) if isinstance(rewards, list) else (rewards, ())
    # A data key set to null counts as absent, so `--set stages.dpo.data.train=null` removes one.
    data = {k: v for k, v in _mapping(s.get("data"), f"{where_key}.data", where).items() if v is not None}
    train = _mapping(s.get("train"), f"{where_key}.train", where)
    kind = stage_kinds[kind_name].KIND if stage_kinds is not None else None
    log_completions = parse_log_completions(train.pop("log_completions", None), f"{where_key}.train.log_completions", where)
    if log_completions is not None and kind is not None and kind.output != "policy":
        raise UserError(f"{where(f'{where_key}.train.log_completions')}: {where_key}.train.log_completions samples a "
                        f"policy while it trains; a {kind_name} stage trains none")
    report_to = parse_report_to(s["report_to"], f"{where_key}.report_to", where) if "report_to" in s else None
    if kind is not None:
        for key in data:
            if key not in kind.data_keys:
                raise UserError(f"{where(f'{where_key}.data.{key}')}: unknown key {where_key}.data.{key}{_suggest(key, kind.data_keys)}")
        train = _train_settings(train, kind, where_key, where)
    data = _check_data(data, where_key, where, kind)
    data = {k: (_resolve_path(v, where.base_dir(f"{where_key}.data.{k}")) if k in PATH_KEYS else v)
            for k, v in data.items()}
    return StageConfig(name=sname, kind=kind_name, data=data, train=train, after=s.get("after"), reward=reward,
                       more_rewards=more_rewards, report_to=report_to, log_completions=log_completions)


def _train_settings(train: dict, kind: StageKind, where_key: str, where: _Where) -> dict:
    """`train:` keys checked against the fields (and types) of the kind's config class."""
    train_fields = {f.name for f in dataclasses.fields(kind.config_class)}
    hints = typing.get_type_hints(kind.config_class)
    train = {k: _coerce(v, hints.get(k, Any)) for k, v in train.items()}
    for key, value in train.items():
        at = where(f"{where_key}.train.{key}")
        if key in MANAGED_TRAIN_KEYS:
            hint = "; name trackers with report_to: at the top level or the stage's" if key == "report_to" else ""
            raise UserError(f"{at}: {where_key}.train.{key} is set by alignkit "
                            f"(checkpoints and TensorBoard logs go into the stage directory){hint}")
        if key not in train_fields:
            raise UserError(f"{at}: unknown key {where_key}.train.{key}{_suggest(key, train_fields)}")
        if not _check_type(value, hints.get(key, Any)):
            raise UserError(f"{at}: {where_key}.train.{key}={value!r} is not a valid {_type_name(hints.get(key))}")
    if train.get("use_liger_kernel") and not liger_available():
        raise UserError(f"{where(f'{where_key}.train.use_liger_kernel')}: {where_key}.train.use_liger_kernel "
                        f"needs the liger-kernel package (pip install 'alignkit[gpu]'), or set it to false")
    return train


def _check_references(stages: list[StageConfig], where: _Where) -> None:
    """Unique names; `after:` and `reward:` name another stage of the recipe; no cycles."""
    names = [s.name for s in stages]
    for s in stages:
        if names.count(s.name) > 1:
            raise UserError(f"{where(f'stages.{s.name}')}: two stages are named {s.name!r}")
        for role, ref in s.references().items():
            if ref not in names:
                raise UserError(f"{where(f'stages.{s.name}.{role}')}: stages.{s.name}.{role}: no stage named {ref!r}{_suggest(ref, names)}")
            if ref == s.name:
                raise UserError(f"{where(f'stages.{s.name}.{role}')}: stage {s.name!r} cannot depend on itself")
    order_stages(stages, where=where)  # raises on cycles


def _check_peft_limits(peft: PeftSettings, stages: list[StageConfig], where: _Where,
                       stage_kinds: Mapping[str, StageRecipe] | None) -> None:
    """What a PEFT method cannot do, known from the YAML: refused before any stage trains."""
    if peft.method in ("prompt_tuning", "prefix_tuning"):
        child = next((s for s in stages if s.after), None)
        if child is not None:
            raise UserError(f"{where(f'stages.{child.name}.after')}: peft.method={peft.method} cannot be continued by a "
                            f"later stage (PEFT loads prompt-learning adapters frozen only); use lora/dora/ia3 for chained stages")
    if peft.method == "prefix_tuning":
        # PEFT refuses both once the model is loaded: prefix tuning feeds past key values, which gradient
        # checkpointing (on by default in TRL's configs) and sequence-classification models do not take.
        for s in stages:
            if s.kind == "reward":
                raise UserError(f"{where(f'stages.{s.name}.kind')}: peft.method=prefix_tuning cannot train a reward "
                                "model (it needs past key values, which the score model does not take); use lora")
            if s.train.get("gradient_checkpointing") is not False:
                raise UserError(f"{where(f'stages.{s.name}.train')}: peft.method=prefix_tuning does not work with "
                                f"gradient checkpointing: set stages.{s.name}.train.gradient_checkpointing: false")
    if peft.method == "ia3" and stage_kinds is not None:
        child = next((s for s in stages if s.after and stage_kinds[s.kind].KIND.copies_parent_as_reference), None)
        if child is not None:
            raise UserError(f"{where(f'stages.{child.name}.after')}: a {child.kind} stage cannot continue an ia3 adapter "
                            f"(TRL would take the base, not stage {child.after}, as its reference); use lora or dora")


def _check_stage_roles(stages: list[StageConfig], stage_kinds: Mapping[str, StageRecipe], where: _Where) -> None:
    """What each reference may name, from the kinds' declarations and the YAML alone: checked here rather than
    when the stage starts, after its parents trained. alignkit.stage.check_parents checks the stage.json again."""
    by_name = {s.name: s for s in stages}
    kinds = {s.kind: stage_kinds[s.kind].KIND for s in stages}
    for s in stages:
        kind = kinds[s.kind]
        if kind.takes_reward and kind.reward_required and not s.reward:
            raise UserError(f"{where(f'stages.{s.name}')}: a {s.kind} stage needs `reward:` naming a stage of kind reward")
        if s.reward and not kind.takes_reward:
            raise UserError(f"{where(f'stages.{s.name}.reward')}: only {', '.join(k for k in sorted(stage_kinds) if stage_kinds[k].KIND.takes_reward)} stages take "
                            f"`reward:` (a {s.kind} stage would ignore it)")
        if s.more_rewards and not kind.reward_ensemble:
            raise UserError(f"{where(f'stages.{s.name}.reward')}: stages.{s.name}.reward lists {len(s.more_rewards) + 1} "
                            f"reward stages; only {', '.join(k for k in sorted(stage_kinds) if stage_kinds[k].KIND.reward_ensemble)} "
                            f"stages take an ensemble, a {s.kind} stage takes one")
        for ref in filter(None, (s.reward, *s.more_rewards)):
            if kinds[by_name[ref].kind].output != "reward":
                raise UserError(f"{where(f'stages.{s.name}.reward')}: stages.{s.name}.reward names {ref!r}, "
                                f"a {by_name[ref].kind} stage, not a reward stage")
        parent = kinds[by_name[s.after].kind] if s.after else None
        if parent is not None and not kind.accepts_after(parent):
            allowed = "a policy (sft, dpo, kto, ...)" if kind.after == "policy" else "a " + " or ".join(kind.after) + " stage"
            hint = "; a reward stage goes under `reward:`" if parent.output == "reward" else ""
            raise UserError(f"{where(f'stages.{s.name}.after')}: stages.{s.name}.after names {s.after!r}, a "
                            f"{parent.name} stage: a {s.kind} stage starts from {allowed}{hint}")


def _check_data(data: dict, where_key: str, where: _Where, kind: StageKind | None) -> dict:
    """A stage's data values, checked at their YAML line or --set; returns data with overridden alternatives dropped."""
    for key, problem in value_problems(data):
        raise UserError(f"{where(f'{where_key}.data.{key}')}: {where_key}.data.{key}{problem}")
    for first, second in both_set(data):
        given = {k: where.override(f"{where_key}.data.{k}") is not None for k in (first, second)}
        if given[first] == given[second]:
            raise UserError(f"{where(f'{where_key}.data.{second}')}: {where_key}.data sets both {first} and {second}; "
                            f"{second} would be ignored, remove one")
        # One of them came from --set: the command line replaces the YAML's choice, as the recipes'
        # headers show (`--set stages.dpo.data.labels_db=labels.db` over a YAML `train:`).
        del data[second if given[first] else first]
    for key, problem in missing_companions(data):
        raise UserError(f"{where(f'{where_key}.data.{key}')}: {where_key}.data.{key}{problem}")
    if kind is not None:
        needs = kind.required_data()
        if needs and not any(k in data for k in needs):
            either = f" (or {needs[1]})" if len(needs) > 1 else ""
            raise UserError(f"{where(f'{where_key}.data')}: {where_key}.data.{needs[0]}{either} is required")
    return data


def order_stages(stages: list[StageConfig], *, where: _Where | None = None) -> list[StageConfig]:
    """Dependency order (parents first), stable with respect to the file order."""
    from graphlib import CycleError, TopologicalSorter

    by_name = {s.name: s for s in stages}
    sorter = TopologicalSorter({s.name: set(s.references().values()) for s in stages})
    try:
        sorter.prepare()
    except CycleError as err:
        cycle = err.args[1]
        message = f"stages depend on each other in a cycle: {' -> '.join(cycle)}"
        if where is not None:
            # Point at the first reference in file order that closes the loop: removing one breaks it.
            stage = next(s for s in stages if s.name in cycle)
            role = next(r for r, ref in stage.references().items() if ref in cycle)
            message = f"{where(f'stages.{stage.name}.{role}')}: {message} (stages.{stage.name}.{role})"
        raise UserError(message) from None
    ordered, position = [], {s.name: i for i, s in enumerate(stages)}
    while sorter.is_active():
        ready = sorted(sorter.get_ready(), key=position.get)
        for name in ready:
            ordered.append(by_name[name])
            sorter.done(name)
    return ordered


def descendants(stages: list[StageConfig], name: str) -> set[str]:
    out, frontier = set(), {name}
    while frontier:
        frontier = {s.name for s in stages if set(s.references().values()) & frontier} - out
        out |= frontier
    return out
