"""SmolMixtral: a compact sparse mixture-of-experts decoder (8 SwiGLU experts, top-2, noisy routing)."""
