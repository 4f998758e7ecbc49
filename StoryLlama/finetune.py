"""Fine-tune a StoryLlama checkpoint into an assistant: `python finetune.py --init_from CHECKPOINT
[--flags]`, or under torchrun for DDP. Every field of StoryLlamaConfig, TrainConfig and FinetuneConfig
is a flag; `python finetune.py --help` lists them, with the defaults a fine-tune takes.

    # supervised fine-tuning of every weight, into out/StoryLlama-sft
    python finetune.py --init_from out/StoryLlama --dataset yahma/alpaca-cleaned
    # LoRA adapters of rank 16 (out/StoryLlama-lora); the same command + --resume continues it exactly
    python finetune.py --init_from out/StoryLlama --dataset chat.jsonl --lora_rank 16
    # DPO on preference pairs, from the SFT model (out/StoryLlama-dpo)
    python finetune.py --method dpo --init_from out/StoryLlama-sft --dataset trl-lib/ultrafeedback_binarized
    # the adapter folded into a plain checkpoint (out/StoryLlama-lora-merged), for export and push
    python finetune.py --merge out/StoryLlama-lora
    # talk to it
    python inference.py --checkpoint out/StoryLlama-sft --chat
"""
from smolhub.cli import run_main
from smolhub.finetune import main as finetune_main
from StoryLlama.model import StoryLlama


def main(argv: list[str] | None = None) -> dict:
    return finetune_main(StoryLlama, argv)


if __name__ == "__main__":
    run_main(main)
