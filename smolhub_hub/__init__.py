"""SmolHub on the Hugging Face Hub: push and pull checkpoints, export to (and import from) transformers.

    python -m smolhub_hub push | pull | export | import   (see `--help` of each)

hub.py moves checkpoints, card.py writes the model card, export.py drives the conversions that each
model folder's state_dict_adapter.py defines (with the shared pieces of state_dict_adapter.py here), and
configuration_smolhub.py / modeling_smolhub.py are the self-contained modelling code copied into
exports of architectures transformers has no class for.
"""
