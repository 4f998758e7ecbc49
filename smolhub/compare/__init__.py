"""Compare architectures fairly: `python -m smolhub.compare study.yaml`.

A study trains several arms (a model folder and its trainer flags) on the same data under one
budget, once per seed, and reports their validation bits per byte, the one unit that compares
models across tokenizers:

    dataset: ../shared/data/tinyshakespeare/input.txt   # any --dataset the trainers accept
    budget: {tokens: 20000000}          # or {flops: 1.0e+17} (training FLOPs) or {seconds: 3600}
    seeds: [1, 2]
    out_dir: studies/shakespeare
    arms:
      - {name: llama, model: StoryLlama, flags: {preset: tiny}}
      - {name: gpt, model: SmolTransformer, flags: {preset: tiny, lr: 1.0e-3}}

Optional keys: flags (given to every arm, before its own), tokenizer (else each arm's own
default), val_dataset, val_fraction, data_dir (the tokenised-data cache, default data_cache),
nproc_per_node (above 1, each trainer runs under torchrun), tasks (scored on every final
checkpoint by `python -m smolhub.eval --tasks`) and eval_flags (its other flags: include_path,
limit, ...). Flags are a mapping of fields to values or a list of command-line words. Relative
paths are taken from the folder the command runs in.

Equal tokens gives every arm budget / tokens-per-step steps; equal FLOPs gives each arm steps in
inverse proportion to its training FLOPs per token (the model's `flops_per_token` at its context,
counted on the config its trainer builds); equal seconds stops every trainer once its training
time reaches the budget (--max_seconds), the --max_steps of its flags being the schedule's
horizon.

Each run is an ordinary run folder, out_dir/<arm>/seed-<seed>, written by the arm's own trainer.py;
a seed gives every arm the same data order, and on one dataset with the same validation flags
every arm is scored on the same validation documents. Running the command again after a kill
continues where it stopped: finished runs are kept, an interrupted one continues with --resume.
The study ends with out_dir/report.md, report.json and plots of val bits per byte against tokens,
training FLOPs and training seconds (as the trainer logs them: evaluation, samples and saves
excluded), one line per arm, the seeds' range shaded.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from smolhub.compare.report import summarize, write_report
from smolhub.compare.study import Plan, Study, load_study, plan, train

__all__ = ["Plan", "Study", "load_study", "main", "plan", "summarize", "train", "write_report"]


@dataclass
class CompareArgs:
    spec: str = field(metadata={"positional": True, "help": "The study: a YAML or JSON file."})
    dry_run: bool = field(default=False, metadata={
        "help": "Print each arm's steps, tokens and FLOPs under the budget, and train nothing."})


def main(argv: list[str] | None = None) -> dict | None:
    """Train every arm x seed of the study (those not finished yet), then write its report; returns
    the report (None with --dry_run)."""
    from smolhub.cli import parse_cli

    (args,) = parse_cli((CompareArgs,), None, argv, prog="python -m smolhub.compare", description=(
        "Train every arm of a study (a model folder and its trainer flags) once per seed on the same data under "
        "one budget (equal tokens, training FLOPs or wall-clock seconds), then write report.md, report.json and "
        "plots of val bits per byte to its out_dir. The spec's keys: arms (each a name, a model such as "
        "StoryLlama, and flags), dataset, budget ({tokens: N}, {flops: N} or {seconds: N}), seeds, out_dir; "
        "optional: flags, tokenizer, val_dataset, val_fraction, data_dir, nproc_per_node, tasks, eval_flags. Run it "
        "again after a kill to continue the study where it stopped."))
    study = load_study(args.spec)
    plans = plan(study)
    for p in plans:
        tokens = p.max_steps * p.tokens_per_step
        print(f"{p.arm.name}: {p.arm.model}, {p.max_steps:,} steps x {p.tokens_per_step:,} tokens"
              + (f", stopping at {p.max_seconds:g} s of training" if p.max_seconds else
                 f" = {tokens:,} tokens, {p.flops_per_token * tokens:.3g} FLOPs"), flush=True)
    if args.dry_run:
        return None
    for seed in study.seeds:
        for p in plans:
            train(study, p, seed)
    report = summarize(study, plans)
    write_report(report, study.out_dir)
    print(f"report: {study.out_dir / 'report.md'}")
    return report
