"""`train.eval_tasks`: evaluation tasks (maxlm.eval.tasks) run on the current parameters at every held-out eval,
their metrics logged as `eval_<task>_<metric>` beside the eval loss (metrics.jsonl and TensorBoard's eval/ group).

The task files are read and checked when the run starts, before any data is prepared, so a typo costs no training.
The scorer is built once and compiled once per bucket; each eval only swaps in the new weights.
"""

from __future__ import annotations

import logging
from typing import Any

from flax import nnx

from maxlm.config import ConfigError
from maxlm.eval.tasks import Task, TaskError, discover, fewshot_examples, load_task

log = logging.getLogger(__name__)


class TaskEval:
  """The run's evaluation tasks; calling it scores them on (graphdef, params) and returns the scalars to log."""

  def __init__(self, cfg: Any, processes: int):
    t = cfg.train
    paths = [p.strip() for p in str(t.eval_tasks).split(",") if p.strip()]
    self.cfg = cfg
    self.limit = int(t.eval_tasks_limit) or None
    self.num_fewshot = int(t.eval_tasks_fewshot)
    try:
      self.tasks: list[Task] = [load_task(p) for p in discover(paths)] if paths else []
      for task in self.tasks:
        if task.type != "perplexity":
          fewshot_examples(task, 0, self.num_fewshot, seed=0)
    except TaskError as e:
      raise ConfigError(f"train.eval_tasks: {e}".replace("--num-fewshot", "train.eval_tasks_fewshot")) from None
    generate = [task.name for task in self.tasks if task.type == "generate"]
    if generate and processes > 1:
      raise ConfigError(f"train.eval_tasks: generation task(s) {', '.join(generate)} run on the serving engine, "
                        f"which runs in one process; this run has {processes}")
    self._lm = None

  def __bool__(self) -> bool:
    return bool(self.tasks)

  def __call__(self, graphdef: nnx.GraphDef, params: Any, tokenizer: Any, mesh: Any) -> dict[str, float]:
    """{"eval_<task>_<metric>": value} of every task on the model (graphdef, params)."""
    from maxlm.eval.task_model import task_model  # noqa: PLC0415
    from maxlm.eval.task_runner import run_tasks  # noqa: PLC0415

    model = nnx.merge(graphdef, params)
    if self._lm is None:
      self._lm = task_model(model, self.cfg, tokenizer, mesh=mesh, seq_len=int(self.cfg.data.seq_len))
    else:
      self._lm.update(model)
    report = run_tasks(self._lm, self.tasks, num_fewshot=self.num_fewshot, limit=self.limit, progress=False)
    out = {}
    for name, result in report["tasks"].items():
      for metric, m in result["metrics"].items():
        out[f"eval_{name}_{metric}"] = float(m["value"])
    return out
