"""An OpenAI-compatible server for a checkpoint: `python -m smolhub.serve --checkpoint PATH`.

batching.py decodes every request in flight together (continuous batching); api.py is the HTTP API
(FastAPI) in front of it; __main__.py the command line."""
