"""StoryMixtral: the Mixtral architecture (sparse MoE, GQA, sliding-window attention) for story generation."""
