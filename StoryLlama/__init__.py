"""StoryLlama: a Llama-style decoder (RoPE, SwiGLU, GQA/MQA, RMSNorm) for story generation."""
