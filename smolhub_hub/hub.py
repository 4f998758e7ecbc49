"""Hub transfers. Only safetensors, JSON and tokenizer text files are ever fetched: no pickle."""
from __future__ import annotations

from pathlib import Path

from smolhub.errors import UserError

ALLOWED_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.md", "*.png"]


def download_checkpoint(repo_id: str, revision: str | None = None) -> Path:
    """Fetch a checkpoint repo (or a revision of it) into the local HF cache and return its folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOWED_PATTERNS))
    except RepositoryNotFoundError:
        raise UserError(f"Hub repo {repo_id!r} does not exist (or is private: log in with `hf auth login` "
                        "or set HF_TOKEN); check the id or pass a local checkpoint folder")
    except RevisionNotFoundError:
        raise UserError(f"Hub repo {repo_id!r} has no revision {revision!r}")
    except GatedRepoError:
        raise UserError(f"Hub repo {repo_id!r} is gated: accept its terms on the Hub and log in")
    except (LocalEntryNotFoundError, OSError) as e:
        raise UserError(f"cannot reach the Hugging Face Hub for {repo_id!r} and it is not in the local cache "
                        f"({type(e).__name__}); pass a local checkpoint folder instead")
    if not (folder / "model.safetensors").is_file() or not (folder / "config.json").is_file():
        raise UserError(f"Hub repo {repo_id!r} holds no SmolHub checkpoint (model.safetensors + config.json)")
    return folder
