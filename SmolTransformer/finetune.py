"""Fine-tune a SmolTransformer checkpoint into an assistant: `python finetune.py --init_from CHECKPOINT
[--flags]`, or under torchrun for DDP. Every field of SmolTransformerConfig, TrainConfig and FinetuneConfig
is a flag; `python finetune.py --help` lists them, with the defaults a fine-tune takes.

    # supervised fine-tuning of every weight, into out/SmolTransformer-sft
    python finetune.py --init_from out/SmolTransformer --dataset yahma/alpaca-cleaned
    # LoRA adapters of rank 16 (out/SmolTransformer-lora); the same command + --resume continues it exactly
    python finetune.py --init_from out/SmolTransformer --dataset chat.jsonl --lora_rank 16
    # DPO on preference pairs, from the SFT model (out/SmolTransformer-dpo)
    python finetune.py --method dpo --init_from out/SmolTransformer-sft --dataset trl-lib/ultrafeedback_binarized
    # the adapter folded into a plain checkpoint (out/SmolTransformer-lora-merged), for export and push
    python finetune.py --merge out/SmolTransformer-lora
    # talk to it
    python inference.py --checkpoint out/SmolTransformer-sft --chat
"""
from smolhub.cli import run_main
from smolhub.finetune import main as finetune_main
from SmolTransformer.model import SmolTransformer


def main(argv: list[str] | None = None) -> dict:
    return finetune_main(SmolTransformer, argv)


if __name__ == "__main__":
    run_main(main)
