"""StoryKimi: a DeepSeek-V3 / Kimi K2-style decoder (latent attention, sigmoid-routed MoE, Muon) for stories."""
