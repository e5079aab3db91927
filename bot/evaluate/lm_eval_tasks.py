"""lm-eval tasks on an in-memory model: scores per task, and YAML tasks for JSONL files.

The sweep changes one model's weights in place between evaluations, so the model is wrapped in
lm-eval's HFLM afresh on each call (about a millisecond; nothing is copied or cached). Indexing
lm-eval's built-in tasks takes seconds, so it happens once per process and only when a task is
not found under `include_path`, whose own index is rebuilt on every call (milliseconds).
Nothing here downloads: the sweep's callers run it offline (bot/hub.py `offline`), so a task's
data must be local (a JSONL task) or already in the datasets cache (a built-in task).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import yaml

from bot.errors import InputNotFoundError, UsageError

TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
HFLM_NOTICES = ("`pretrained` model kwarg is not of type `str`",
                "Passed an already-initialized model through `pretrained`")


def lm_eval_scores(model, tokenizer, tasks: list[str], include_path: str | Path | None = None,
                   limit: int | None = None, batch_size: int = 16, chat: bool = True, *,
                   system_prompt: str | None = None) -> dict[str, float]:
    """Scores of lm-eval tasks on an in-memory model (lm-eval's HFLM wrapping it).

    Returns {task_name: primary metric value}, higher is better. Primary metric: the first one
    lm-eval reports for the task (metric_list order, first filter: `exact_match,strip` gives
    `exact_match`), skipping stderr entries and metrics lm-eval marks lower-is-better. Names are
    looked up in `include_path` (a folder of task YAMLs) first, then among lm-eval's built-ins.
    `chat` is lm-eval's `apply_chat_template` (few-shot examples as turns); `system_prompt` its
    `system_instruction`. Runs `lm_eval.evaluator.evaluate` set up as `simple_evaluate` would
    (zero-shot unless the task says otherwise, lm-eval's few-shot seed), without its per-call
    environment report (0.3 s of subprocesses) or reseeding of the global RNGs.
    """
    if not tasks:
        raise UsageError("No lm-eval task given.")
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    local = _local_manager(include_path)
    with _quiet_hflm_notices():
        loaded = _load_tasks(tasks, local, include_path)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=0,
                       log_samples=False, system_instruction=system_prompt,
                       apply_chat_template=chat, fewshot_as_multiturn=chat)
    return {name: _primary(name, out) for name in tasks}


def write_jsonl_task(directory: Path, name: str, data_file: Path, *,
                     max_new_tokens: int = 32) -> Path:
    """Write `directory/<name>.yaml`: an lm-eval task scoring a JSONL file by exact match.

    Rows are {"prompt": ..., "answer": ...}; the prompt is the user turn, the answer is generated
    greedily until the model's end of turn (its EOS, which HFLM always stops at) or
    `max_new_tokens`, and must equal the answer once both are stripped of whitespace.
    """
    if not TASK_NAME.fullmatch(name):
        raise UsageError(f"Task name {name!r} must be letters, digits, '_', '.' or '-'.")
    data_file = Path(data_file).resolve()
    if not data_file.is_file():
        raise InputNotFoundError(f"Task data file {data_file} does not exist.")
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "generate_until",
        "num_fewshot": 0,
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer | trim}}",
        "generation_kwargs": {"until": [], "do_sample": False, "max_gen_toks": max_new_tokens},
        "filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"},
                                                     {"function": "take_first"}]}],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean",
                         "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def _local_manager(include_path: str | Path | None):
    """A TaskManager over `include_path` alone (rebuilt per call, so new YAMLs are seen)."""
    from lm_eval.tasks import TaskManager

    if include_path is None:
        return None
    if not Path(include_path).is_dir():
        raise InputNotFoundError(f"lm-eval include path {include_path} is not a folder.")
    return TaskManager(include_path=str(include_path), include_defaults=False)


@functools.cache
def _builtin_manager():
    """lm-eval's built-in task index: built once per process (seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def _load_tasks(names: list[str], local, include_path) -> dict:
    """lm-eval's task dict for `names`, each built by the first manager that knows it."""
    from lm_eval.defaults import DEFAULT_OTHER_SEED

    built = []
    for name in dict.fromkeys(names):
        if local is not None and name in local.all_tasks:
            manager = local
        elif name in _builtin_manager().all_tasks:
            manager = _builtin_manager()
        else:
            raise UsageError(_not_found(name, include_path))
        built.append(_build_one(name, manager))
    loaded = (local or _builtin_manager()).load(built)
    for task in loaded["tasks"].values():
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
    return loaded


def _build_one(name: str, manager):
    """The Task or Group object for `name`; a config lm-eval rejects is a UsageError."""
    if name in manager.all_tags:
        raise UsageError(f"lm-eval name {name!r} is a tag, which has no single score; "
                         "name its tasks or a group instead.")
    source = manager.task_index[name].yaml_path
    try:
        loaded = manager.load([name])
    except Exception as err:
        raise UsageError(f"lm-eval could not build task {name!r} from {source}: "
                         f"{type(err).__name__}: {err}") from err
    return loaded["groups"].get(name) or loaded["tasks"][name]


def _not_found(name: str, include_path) -> str:
    """The message for an unknown task, naming the YAMLs lm-eval could not read."""
    where = f"in include path {include_path} nor " if include_path is not None else ""
    message = f"lm-eval task {name!r} not found {where}among lm-eval's built-in tasks."
    broken = _unreadable_yamls(include_path) if include_path is not None else []
    if broken:
        message += " These task files could not be read: " + "; ".join(broken)
    return message


def _unreadable_yamls(include_path) -> list[str]:
    """'file: error' for each YAML under `include_path` that lm-eval cannot parse."""
    from lm_eval.tasks._yaml_loader import load_yaml

    broken = []
    for path in sorted(Path(include_path).glob("**/*.yaml")):
        try:
            config = load_yaml(path, resolve_func=False, recursive=True)
            if not isinstance(config, dict) or not ({"task", "group"} & set(config)):
                raise ValueError("no 'task' or 'group' key")
        except Exception as err:
            broken.append(f"{path}: {type(err).__name__}: {' '.join(str(err).split())}")
    return broken


def _primary(name: str, out: dict) -> float:
    """The first higher-is-better, non-stderr metric lm-eval reported for `name`."""
    results = out["results"].get(name, {})
    direction = out.get("higher_is_better", {}).get(name, {})
    for key, value in results.items():
        if "," not in key:
            continue
        metric = key.split(",", 1)[0]
        if metric.endswith("_stderr") or direction.get(metric) is False:
            continue
        if isinstance(value, int | float):
            return float(value)
    raise UsageError(f"lm-eval reported no higher-is-better metric for {name!r}.")


class _DropHflmNotices(logging.Filter):
    """Drops HFLM's per-call warnings about being given a model object, which is our design."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(HFLM_NOTICES)


@contextlib.contextmanager
def _quiet_hflm_notices() -> Iterator[None]:
    """Silence HFLM's two notices about an already-built model while the call runs."""
    logger = logging.getLogger("lm_eval.models.huggingface")
    notices = _DropHflmNotices()
    logger.addFilter(notices)
    try:
        yield
    finally:
        logger.removeFilter(notices)
