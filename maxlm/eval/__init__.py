"""Evaluation: held-out loss during training, perplexity and bits per byte, and evaluation tasks (`maxlm eval`).

heldout.py        the training loop's held-out loss (mean token NLL of the eval split's fixed batches)
windows.py        rolling windows: every token after a document's first scored once, with the most left context
loglikelihood.py  per-row log-likelihoods of right-padded windows, jitted on the model's mesh; documents' NLL
continuations.py  log-likelihood of (context, continuation) requests in bucketed batches
perplexity.py     `maxlm eval --data / --tokenized`: reading text / JSONL / tokenized splits, the report table and JSON
tasks.py          task files (multiple_choice, generate, perplexity): loading, checking, few-shot prompts
task_metrics.py   accuracy (plain, length-normalized), exact match, regex extraction, standard errors
generation.py     completions of many prompts through the serving engine's continuous batching
task_runner.py    running tasks on a TaskModel (scorer + engine over one copy of the weights)
task_model.py     the TaskModel of a workdir or of a model in memory (the training loop's train.eval_tasks)
task_report.py    `maxlm eval --tasks`: table, JSON with per-sample records, PNG with standard-error bars
harness.py        the lm-evaluation-harness backend (`--model maxlm`)
"""
