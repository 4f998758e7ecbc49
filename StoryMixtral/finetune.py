"""Fine-tune a StoryMixtral checkpoint into an assistant: `python finetune.py --init_from CHECKPOINT
[--flags]`, or under torchrun for DDP. Every field of StoryMixtralConfig, TrainConfig and FinetuneConfig
is a flag; `python finetune.py --help` lists them, with the defaults a fine-tune takes.

    # supervised fine-tuning of every weight, into out/StoryMixtral-sft
    python finetune.py --init_from out/StoryMixtral --dataset yahma/alpaca-cleaned
    # LoRA adapters of rank 16 (out/StoryMixtral-lora); the same command + --resume continues it exactly
    python finetune.py --init_from out/StoryMixtral --dataset chat.jsonl --lora_rank 16
    # LoRA on attention only, the experts frozen
    python finetune.py --init_from out/StoryMixtral --dataset chat.jsonl --lora_rank 16 --no_lora_experts
    # DPO on preference pairs, from the SFT model (out/StoryMixtral-dpo)
    python finetune.py --method dpo --init_from out/StoryMixtral-sft --dataset trl-lib/ultrafeedback_binarized
    # the adapter folded into a plain checkpoint (out/StoryMixtral-lora-merged), for export and push
    python finetune.py --merge out/StoryMixtral-lora
    # talk to it
    python inference.py --checkpoint out/StoryMixtral-sft --chat
"""
from smolhub.cli import run_main
from smolhub.finetune import main as finetune_main
from StoryMixtral.model import StoryMixtral


def main(argv: list[str] | None = None) -> dict:
    return finetune_main(StoryMixtral, argv)


if __name__ == "__main__":
    run_main(main)
