"""StoryMixtral's web demo: streamed generation, sampling controls, a model card and a /generate API;
a chat and a /chat API for a checkpoint fine-tuned by finetune.py.

    python gradio/app.py --checkpoint out/StoryMixtral
"""
from smolhub.app import main
from smolhub.cli import run_main

if __name__ == "__main__":
    run_main(lambda argv: main("StoryMixtral", argv))
