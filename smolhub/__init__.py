"""SmolHub's shared core: everything the five models have in common."""
