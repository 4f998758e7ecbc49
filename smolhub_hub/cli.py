"""`python -m smolhub_hub push | pull | export | import`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from smolhub.cli import Command, parse_command
from smolhub.config import option
from smolhub.errors import UserError

EPILOG = """examples:
  python -m smolhub_hub push out/StoryLlama yourname/StoryLlama --private
  python -m smolhub_hub pull yourname/StoryLlama checkpoints/StoryLlama
  python -m smolhub_hub export out/StoryLlama StoryLlama-hf     # AutoModelForCausalLM.from_pretrained("StoryLlama-hf")
  python -m smolhub_hub export out/StoryLlama StoryLlama-gguf --format gguf --dtype q8_0   # llama.cpp
  python -m smolhub_hub import StoryLlama-hf checkpoints/from-hf
"""


def _argument(help: str):
    return field(metadata={"help": help, "positional": True})


@dataclass
class PushArgs:
    checkpoint: str = _argument("Checkpoint folder or a run's out_dir (its newest checkpoint).")
    repo_id: str = _argument("Target repo, owner/name; created if missing.")
    private: bool = option(False, "Create the repo private (an existing repo keeps its visibility).",
                           action="store_true")
    with_trainer_state: bool = option(False, "Also upload trainer_state.pt (optimizer and data position, pickled) "
                                      "as a backup; `pull` never downloads it.", action="store_true")
    prompts: list[str] = option([], "Prompt for the card's samples (repeatable; none = three story openings).",
                                flag="--prompt", action="append", metavar="TEXT")
    max_new_tokens: int = option(60, "Tokens per sample.")
    seed: int = option(0, "Sampling seed of the card's samples.")
    message: str = option("", "Commit message (empty = the Hub's default).")
    dry_run: bool = option(False, "Print the files and the model card; upload nothing.", action="store_true")


@dataclass
class PullArgs:
    repo_id: str = _argument("Hub repo, owner/name.")
    out_dir: str = option("", "Folder for the files (empty = the Hugging Face cache).", positional=True)
    revision: str = option("", "Branch, tag or commit (empty = main).")


@dataclass
class ExportArgs:
    checkpoint: str = _argument("Checkpoint folder, a run's out_dir or a Hub repo id.")
    out_dir: str = _argument("New folder to write.")
    format: Literal["transformers", "gguf"] = option(
        "transformers", "transformers: a model folder for AutoModelForCausalLM; gguf: one .gguf file for llama.cpp "
        "(StoryLlama, StoryMixtral, StoryKimi).")
    dtype: Literal["auto", "f32", "f16", "bf16", "q8_0"] = option(
        "auto", "Weight type of --format gguf (auto = f16); norms and routers stay f32.")


@dataclass
class ImportArgs:
    exported_dir: str = _argument("Folder written by `python -m smolhub_hub export`.")
    out_dir: str = _argument("New checkpoint folder to write.")


COMMANDS = {
    "push": Command((PushArgs,), help="Upload a checkpoint with a generated model card.",
                    description="Upload model.safetensors, config.json, the tokenizer, a generated README.md (with "
                    "seeded samples) and the run's loss curve. The token comes from HF_TOKEN or `hf auth login` and "
                    "is never printed."),
    "pull": Command((PullArgs,), help="Download a checkpoint repo and check that it loads.",
                    description="Download a checkpoint (safetensors, JSON and tokenizer files only; never pickles) "
                    "into the Hugging Face cache or OUT_DIR, and load it once to check it."),
    "export": Command((ExportArgs,), help="Write a transformers folder (AutoModelForCausalLM / AutoTokenizer).",
                      description="Write CHECKPOINT as a transformers model folder: StoryLlama -> LlamaForCausalLM, "
                      "StoryMixtral -> MixtralForCausalLM, StoryKimi -> DeepseekV3ForCausalLM; SmolTransformer and "
                      "SmolMixtral carry their own modelling code (load with trust_remote_code=True). The export's "
                      "logits are checked against the checkpoint's before the folder appears. --format gguf writes "
                      "one GGUF file for llama.cpp instead (StoryLlama and StoryMixtral as llama, StoryKimi as "
                      "deepseek2)."),
    "import": Command((ImportArgs,), help="Turn an exported folder back into a SmolHub checkpoint.",
                      description="Read a folder written by `export` (weights, config, tokenizer) and write a SmolHub "
                      "checkpoint folder, for inference.py --checkpoint or trainer.py --init_from."),
}


def main(argv: list[str] | None = None) -> None:
    command, (args,) = parse_command(COMMANDS, argv, prog="python -m smolhub_hub", epilog=EPILOG,
                                     description="Share SmolHub checkpoints on the Hugging Face Hub, and convert "
                                     "them to and from transformers model folders.")
    if command == "push":
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
        print(f"pushed: {upload(plan, token, args.private, args.message or None)}")
    elif command == "pull":
        from smolhub_hub.hub import download_checkpoint

        folder = download_checkpoint(args.repo_id, args.revision or None, args.out_dir or None)
        from smolhub.checkpoint import load_checkpoint  # torch: only once there is something to load

        loaded = load_checkpoint(str(folder))
        arch, model = loaded.config["architecture"], loaded.model
        print(f"{args.repo_id} -> {folder}: {arch}, {model.num_params() / 1e6:.2f}M parameters, "
              f"step {loaded.meta.get('step', '?')}")
        print(f"generate:  python {arch}/inference.py --checkpoint {folder}")
        print(f"fine-tune: python {arch}/trainer.py --init_from {folder}")
    elif command == "export":
        if args.format == "gguf":
            from smolhub_hub.gguf import DEFAULT_DTYPE, export_gguf

            done = export_gguf(args.checkpoint, args.out_dir, DEFAULT_DTYPE if args.dtype == "auto" else args.dtype)
            print(f"exported {args.checkpoint} -> {done.path} (llama.cpp {done.arch}, {done.dtype}): {done.exact}")
            return
        if args.dtype != "auto":
            raise UserError("--dtype sets the weight type of --format gguf; a transformers export keeps the "
                            "checkpoint's weights")
        from smolhub_hub.export import export_checkpoint

        folder = export_checkpoint(args.checkpoint, args.out_dir)
        print(f"exported {args.checkpoint} -> {folder} (logits checked against the checkpoint)")
    else:
        from smolhub_hub.export import import_transformers_folder

        folder = import_transformers_folder(args.exported_dir, args.out_dir)
        print(f"imported {args.exported_dir} -> {folder}")
