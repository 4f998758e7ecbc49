"""SmolHub on the Hugging Face Hub: download (and upload) checkpoints."""
