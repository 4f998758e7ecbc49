"""`python -m smolhub_hub push | pull | export | import`."""
from __future__ import annotations

import argparse

from smolhub.errors import UserError

EPILOG = """examples:
  python -m smolhub_hub push out/StoryLlama yourname/StoryLlama --private
  python -m smolhub_hub pull yourname/StoryLlama checkpoints/StoryLlama
  python -m smolhub_hub export out/StoryLlama StoryLlama-hf     # AutoModelForCausalLM.from_pretrained("StoryLlama-hf")
  python -m smolhub_hub import StoryLlama-hf checkpoints/from-hf
"""


class _Parser(argparse.ArgumentParser):
    """A bad flag becomes one UserError line (run_main prints it) instead of argparse's usage dump."""

    def error(self, message: str):
        raise UserError(f"{message} (run with --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m smolhub_hub", description="Share SmolHub checkpoints on the Hugging Face "
                     "Hub, and convert them to and from transformers model folders.", epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    push = sub.add_parser("push", help="Upload a checkpoint with a generated model card.",
                          description="Upload model.safetensors, config.json, the tokenizer, a generated README.md "
                          "(with seeded samples) and the run's loss curve. The token comes from HF_TOKEN or "
                          "`hf auth login` and is never printed.")
    push.add_argument("checkpoint", help="Checkpoint folder or a run's out_dir (its newest checkpoint).")
    push.add_argument("repo_id", help="Target repo, owner/name; created if missing.")
    push.add_argument("--private", action="store_true", help="Create the repo private (an existing repo keeps "
                      "its visibility).")
    push.add_argument("--with_trainer_state", action="store_true", help="Also upload trainer_state.pt (optimizer "
                      "and data position, pickled) as a backup; `pull` never downloads it.")
    push.add_argument("--prompt", action="append", dest="prompts", metavar="TEXT",
                      help="Prompt for the card's samples (repeatable; default: three story openings).")
    push.add_argument("--max_new_tokens", type=int, default=60, help="Tokens per sample (default 60).")
    push.add_argument("--seed", type=int, default=0, help="Sampling seed of the card's samples (default 0).")
    push.add_argument("--message", help="Commit message.")
    push.add_argument("--dry_run", action="store_true", help="Print the files and the model card; upload nothing.")

    pull = sub.add_parser("pull", help="Download a checkpoint repo and check that it loads.",
                          description="Download a checkpoint (safetensors, JSON and tokenizer files only; never "
                          "pickles) into the Hugging Face cache or OUT_DIR, and load it once to check it.")
    pull.add_argument("repo_id", help="Hub repo, owner/name.")
    pull.add_argument("out_dir", nargs="?", help="Folder for the files (default: the Hugging Face cache).")
    pull.add_argument("--revision", help="Branch, tag or commit (default: main).")

    export = sub.add_parser("export", help="Write a transformers folder (AutoModelForCausalLM / AutoTokenizer).",
                            description="Write CHECKPOINT as a transformers model folder: StoryLlama -> "
                            "LlamaForCausalLM, StoryMixtral -> MixtralForCausalLM, StoryKimi -> "
                            "DeepseekV3ForCausalLM; SmolTransformer and SmolMixtral carry their own modelling "
                            "code (load with trust_remote_code=True). The export's logits are checked against "
                            "the checkpoint's before the folder appears.")
    export.add_argument("checkpoint", help="Checkpoint folder, a run's out_dir or a Hub repo id.")
    export.add_argument("out_dir", help="New folder to write.")

    imp = sub.add_parser("import", help="Turn an exported folder back into a SmolHub checkpoint.",
                         description="Read a folder written by `export` (weights, config, tokenizer) and write "
                         "a SmolHub checkpoint folder, for inference.py --checkpoint or trainer.py --init_from.")
    imp.add_argument("exported_dir", help="Folder written by `python -m smolhub_hub export`.")
    imp.add_argument("out_dir", help="New checkpoint folder to write.")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "push":
        from smolhub_hub.hub import check_repo_id, hub_token, plan_upload, upload

        check_repo_id(args.repo_id)
        if args.max_new_tokens <= 0:
            raise UserError(f"--max_new_tokens must be positive, got {args.max_new_tokens}")
        token = None if args.dry_run else hub_token()  # before the samples: fail fast without a token
        plan = plan_upload(args.checkpoint, args.repo_id, args.with_trainer_state, args.prompts,
                           args.max_new_tokens, args.seed)
        print(plan.describe())
        if args.dry_run:
            print("\n--- README.md ---\n" + plan.card)
            return
        print(f"pushed: {upload(plan, token, args.private, args.message)}")
    elif args.command == "pull":
        from smolhub_hub.hub import download_checkpoint

        folder = download_checkpoint(args.repo_id, args.revision, args.out_dir)
        from smolhub.checkpoint import load_checkpoint  # torch: only once there is something to load

        loaded = load_checkpoint(str(folder))
        arch, model = loaded.config["architecture"], loaded.model
        print(f"{args.repo_id} -> {folder}: {arch}, {model.num_params() / 1e6:.2f}M parameters, "
              f"step {loaded.meta.get('step', '?')}")
        print(f"generate:  python {arch}/inference.py --checkpoint {folder}")
        print(f"fine-tune: python {arch}/trainer.py --init_from {folder}")
    elif args.command == "export":
        from smolhub_hub.export import export_checkpoint

        folder = export_checkpoint(args.checkpoint, args.out_dir)
        print(f"exported {args.checkpoint} -> {folder} (logits checked against the checkpoint)")
    else:
        from smolhub_hub.export import import_export

        folder = import_export(args.exported_dir, args.out_dir)
        print(f"imported {args.exported_dir} -> {folder}")
