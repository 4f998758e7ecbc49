"""Fine-tune a StoryKimi checkpoint into an assistant: `python finetune.py --init_from CHECKPOINT
[--flags]`, or under torchrun for DDP. Every field of StoryKimiConfig, TrainConfig and FinetuneConfig
is a flag; `python finetune.py --help` lists them, with the defaults a fine-tune takes.

    # supervised fine-tuning of every weight, into out/StoryKimi-sft
    python finetune.py --init_from out/StoryKimi --dataset yahma/alpaca-cleaned
    # LoRA adapters of rank 16 (out/StoryKimi-lora); the same command + --resume continues it exactly
    python finetune.py --init_from out/StoryKimi --dataset chat.jsonl --lora_rank 16
    # LoRA on attention only, the experts frozen
    python finetune.py --init_from out/StoryKimi --dataset chat.jsonl --lora_rank 16 --no_lora_experts
    # DPO on preference pairs, from the SFT model (out/StoryKimi-dpo)
    python finetune.py --method dpo --init_from out/StoryKimi-sft --dataset trl-lib/ultrafeedback_binarized
    # the adapter folded into a plain checkpoint (out/StoryKimi-lora-merged), for export and push
    python finetune.py --merge out/StoryKimi-lora
    # talk to it
    python inference.py --checkpoint out/StoryKimi-sft --chat
"""
from smolhub.cli import run_main
from smolhub.finetune import main as finetune_main
from StoryKimi.model import StoryKimi


def main(argv: list[str] | None = None) -> dict:
    return finetune_main(StoryKimi, argv)


if __name__ == "__main__":
    run_main(main)
