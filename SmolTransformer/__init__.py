"""SmolTransformer: a classic GPT decoder (learned positions, multi-head attention, GELU MLP) for web text."""
