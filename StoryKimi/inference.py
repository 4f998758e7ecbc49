"""Generate with a trained StoryKimi.

    python inference.py --checkpoint out/StoryKimi --prompt "Once upon a time" --temperature 0.8 --top_p 0.9
    python inference.py --checkpoint out/StoryKimi-sft --chat    # talk to a checkpoint fine-tuned by finetune.py

From Python, inside this folder (any SmolHub checkpoint loads the same way):

    from inference import load_model, generate_text
    model = load_model("out/StoryKimi")
    print(generate_text(model=model, prompt="Once upon a time", max_length=100, temperature=0.7))
    chat = load_model("out/StoryKimi-sft")
    print(generate_text(model=chat, messages=[{"role": "user", "content": "Tell me a story."}]))
"""
from smolhub.cli import run_main
from smolhub.inference import generate_text, load_model, main

__all__ = ["load_model", "generate_text", "main"]

if __name__ == "__main__":
    run_main(lambda argv: main("StoryKimi", argv))
