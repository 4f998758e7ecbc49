"""Hub transfers. A pull is the core's download_checkpoint (smolhub/hub_download.py), the one every
`--checkpoint user/repo` goes through: only safetensors, JSON and text files are fetched, never a pickle.

A push is planned first (`plan_upload`: which files, the model card) and then sent (`upload`), so
everything but the network call can be inspected, printed (`push --dry_run`) and tested.
The token comes from HF_TOKEN or `hf auth login` and is handed to huggingface_hub only: it is never
printed, logged or written, and error messages are scrubbed of it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from smolhub.errors import UserError
from smolhub.hub_download import check_repo_id, download_checkpoint  # noqa: F401 (pull runs it)

TRAINER_STATE = "trainer_state.pt"
LOSS_CURVE = "loss_curve.png"


def hub_token() -> str:
    """The user's Hub token (HF_TOKEN, else the one `hf auth login` stored)."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise UserError("no Hugging Face token: run `hf auth login` or set HF_TOKEN to a token with write access")
    return token


@dataclass
class UploadPlan:
    """What a push sends: files[path in the repo] = local file, plus the generated README.md."""

    repo_id: str
    checkpoint: Path
    files: dict[str, Path] = field(default_factory=dict)
    card: str = ""

    def describe(self) -> str:
        rows = [f"  {name}  ({path.stat().st_size:,} bytes, from {path})" for name, path in self.files.items()]
        rows.append(f"  README.md  ({len(self.card.encode()):,} bytes, generated)")
        return f"push {self.checkpoint} -> {self.repo_id}:\n" + "\n".join(rows)


def checkpoint_files(folder: Path, with_trainer_state: bool) -> dict[str, Path]:
    """The checkpoint's weights, config, tokenizer (chat_template.jinja included) and report card
    (report_card.json) files (the kinds a pull accepts); the pickled trainer state only when asked
    for, since a pull never fetches it."""
    files = {p.name: p for p in sorted(folder.iterdir())
             if p.is_file() and p.suffix in (".safetensors", ".json", ".txt", ".jinja")}
    if with_trainer_state:
        state = folder / TRAINER_STATE
        if not state.is_file():
            raise UserError(f"{folder} has no {TRAINER_STATE} to upload; drop --with_trainer_state")
        files[TRAINER_STATE] = state
    return files


def plan_upload(checkpoint: str, repo_id: str, with_trainer_state: bool = False,
                prompts: tuple[str, ...] | None = None, max_new_tokens: int = 60, seed: int = 0) -> UploadPlan:
    """Everything a push does short of the network: resolve and load the checkpoint, pick the files,
    generate seeded samples and write the model card."""
    from smolhub.chat import has_chat_format
    from smolhub.checkpoint import ADAPTER_WEIGHTS, load_checkpoint, resolve_checkpoint, weights_file
    from smolhub.eval.report import MARKDOWN_NAME
    from smolhub.generate import SamplingConfig, generate_batch
    from smolhub_hub.card import SAMPLE_PROMPTS, model_card, read_metrics, report_card_table
    from smolhub_hub.export import adapter_for

    check_repo_id(repo_id)
    folder = resolve_checkpoint(checkpoint)
    if weights_file(folder).name == ADAPTER_WEIGHTS:  # its files alone are unusable: they need the base's
        raise UserError(f"{folder} is a LoRA adapter checkpoint: merge it first with `python finetune.py --merge "
                        f"{checkpoint}`, then push the merged folder")
    loaded = load_checkpoint(str(folder))
    model = loaded.model
    files = checkpoint_files(folder, with_trainer_state)
    curve = folder.parent / LOSS_CURVE
    if curve.is_file():
        files[LOSS_CURVE] = curve
    sampling = SamplingConfig(max_new_tokens=min(max_new_tokens, model.config.block_size // 2),
                              temperature=0.8, top_p=0.9, seed=seed)
    prompts = tuple(prompts) if prompts else SAMPLE_PROMPTS
    completions = generate_batch(model, loaded.tokenizer, list(prompts), sampling)
    described = (f"temperature {sampling.temperature}, top-p {sampling.top_p}, seed {seed}, "
                 f"up to {sampling.max_new_tokens} tokens")
    report = folder / MARKDOWN_NAME
    evaluation = report_card_table(report.read_text(encoding="utf-8")) if report.is_file() else ""
    card = model_card(repo_id, loaded.config, model.num_params(), model.num_active_params(),
                      len(loaded.tokenizer), read_metrics(folder.parent), list(zip(prompts, completions)), described,
                      has_curve=LOSS_CURVE in files, remote_code=adapter_for(loaded.config["architecture"]).REMOTE_CODE,
                      evaluation=evaluation, chat=has_chat_format(loaded.tokenizer))
    return UploadPlan(repo_id, folder, files, card)


def _scrub(message: str, token: str) -> str:
    return message.replace(token, "***") if token else message


def upload(plan: UploadPlan, token: str, private: bool = False, message: str | None = None) -> str:
    """Create the repo if needed and commit the planned files in one commit; return the commit URL."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi(token=token)
    ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in plan.files.items()]
    ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=plan.card.encode()))
    try:
        api.create_repo(plan.repo_id, private=private, exist_ok=True)
        info = api.create_commit(plan.repo_id, operations=ops,
                                 commit_message=message or f"Upload {plan.checkpoint.name} with smolhub_hub")
    except OfflineModeIsEnabled:
        raise UserError("HF_HUB_OFFLINE is set: unset it to push to the Hub") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status == 401:
            raise UserError("the Hub rejected the token: run `hf auth login` again or set a valid HF_TOKEN") from None
        if status == 403:
            raise UserError(f"the token may not write to {plan.repo_id!r}: use a token with write access "
                            "to that namespace (or push to your own)") from None
        raise UserError(f"the Hub refused the upload to {plan.repo_id!r}: "
                        f"{_scrub(str(e).splitlines()[0], token)}") from None
    except Exception as e:  # httpx connection errors and timeouts surface as their own types
        raise UserError(f"cannot reach the Hugging Face Hub to push {plan.repo_id!r} ({type(e).__name__}: "
                        f"{_scrub(str(e).splitlines()[0] if str(e) else '', token)}); check the network "
                        "and retry") from None
    return info.commit_url
