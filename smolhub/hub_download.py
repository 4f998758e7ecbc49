"""Checkpoints from the Hugging Face Hub: a repo id -> a local checkpoint folder.

Only safetensors, JSON and text files (and the model card with its loss curve) are ever fetched:
no pickle. No torch here, so a bad id or an offline machine fails before torch is imported.
"""
from __future__ import annotations

import re
from pathlib import Path

from smolhub.errors import UserError

REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")
ALLOWED_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.jinja", "*.md", "*.png"]


def check_repo_id(repo_id: str) -> str:
    if not REPO_ID.fullmatch(repo_id):
        raise UserError(f"{repo_id!r} is not a Hub repo id: use owner/name, e.g. yourname/StoryLlama")
    return repo_id


def download_checkpoint(repo_id: str, revision: str | None = None, local_dir: str | Path | None = None) -> Path:
    """Fetch a checkpoint repo (or a revision of it) into the local HF cache (or local_dir); return its folder."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

    check_repo_id(repo_id)
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOWED_PATTERNS,
                                        local_dir=None if local_dir is None else str(local_dir)))
    except RepositoryNotFoundError:
        raise UserError(f"Hub repo {repo_id!r} does not exist (or is private: log in with `hf auth login` "
                        "or set HF_TOKEN); check the id or pass a local checkpoint folder")
    except RevisionNotFoundError:
        raise UserError(f"Hub repo {repo_id!r} has no revision {revision!r}")
    except GatedRepoError:
        raise UserError(f"Hub repo {repo_id!r} is gated: accept its terms on the Hub and log in")
    except (LocalEntryNotFoundError, OSError) as e:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "cannot reach the Hugging Face Hub"
        raise UserError(f"{why} for {repo_id!r} and it is not in the local cache ({type(e).__name__}); "
                        "pass a local checkpoint folder instead")
    if not (folder / "model.safetensors").is_file() or not (folder / "config.json").is_file():
        raise UserError(f"Hub repo {repo_id!r} holds no SmolHub checkpoint (model.safetensors + config.json)")
    return folder
