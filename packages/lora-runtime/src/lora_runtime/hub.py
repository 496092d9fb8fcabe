"""`push_to_hub`: upload the final adapter (and the merged model) to the Hugging Face Hub with
`huggingface_hub.HfApi().upload_folder`: of the run directory, only the files a run writes (`adapter_files`).

The token is huggingface_hub's own: HF_TOKEN, else the stored `hf auth login`. What cannot work is caught by
`push_issues` when the config is validated, before any data is prepared or any model loaded: a malformed repo id, no
token, or HF_HUB_OFFLINE set. The adapter goes to REPO_ID; the merged model (save_merged) to REPO_ID-merged, so both
load with a plain `from_pretrained(repo_id)`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def adapter_files(run_dir: str | Path) -> list[str]:
    """What of a run directory is uploaded (upload_folder's allow_patterns): what the final save wrote (the adapter
    and every file and folder of the tokenizer, as the seal records them), the card, run record, metrics and plot;
    never a file of the user's own beside them, the checkpoints or the merged model (its own repo)."""
    from lora_runtime.checkpoint import ADAPTER_SUMS, CONFIG_NAME, RUN_FILES, RUN_PREFIXES, SUBDIR, final_files
    from lora_runtime.model_card import CARD_NAME

    written = final_files(run_dir)
    if written is None:  # sealed by an earlier version: the names a run writes
        return sorted(RUN_FILES - {SUBDIR, "merged"}) + [f"{prefix}*" for prefix in RUN_PREFIXES]
    ours = [ADAPTER_SUMS, CARD_NAME, CONFIG_NAME, "metrics.jsonl", "loss.png"]
    return sorted({*written, *(f"{n}/*" for n in written if (Path(run_dir) / n).is_dir()), *ours})


def merged_repo(repo_id: str) -> str:
    return f"{repo_id}-merged"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def push_issues(repo_id: str | None, option: str = "`push_to_hub`") -> list[str]:
    """Why pushing to `repo_id` cannot work from here (empty when it can, or when nothing is to be pushed)."""
    if not repo_id:
        return []
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return [f"{option}={repo_id!r} is not a Hugging Face repo id (NAME or ORG/NAME: letters, digits, '-', '_', '.')"]
    if offline():
        return [f"{option}={repo_id!r} needs the Hugging Face Hub but HF_HUB_OFFLINE is set: unset it, or drop "
                f"{option} and upload the adapter later (`hf upload {repo_id} OUTPUT_DIR --include 'adapter_*' "
                "--include 'tokenizer*' --include 'chat_template*' --include README.md`)"]
    from huggingface_hub import get_token

    if not get_token():
        return [f"{option}={repo_id!r} needs a Hugging Face token with write access: set HF_TOKEN (or run "
                "`hf auth login`)"]
    return []


def push(repo_id: str, folder: str | Path, *, what: str = "adapter", only: list[str] | None = None) -> str:
    """Create `repo_id` if needed and upload `folder` (its files matching `only`, if given) to it; returns the repo's
    URL."""
    from huggingface_hub import HfApi

    from lora_runtime.errors import PushError

    try:
        api = HfApi()  # token from HF_TOKEN or the stored login
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", allow_patterns=only,
                          ignore_patterns=[".*", "**/.*"], commit_message=f"Upload {what} trained with lora-sft")
    except Exception as e:  # the network, the token's rights, the hub: what was to go up is complete here
        why = " ".join(str(e).split())[:300]
        include = "".join(f" --include '{p}'" for p in only or [])
        raise PushError(f"uploading the {what} to {repo_id} failed ({type(e).__name__}: {why}); it is complete in "
                        f"{folder}: upload it later with `hf upload {repo_id} {folder}{include}`") from e
    return f"https://huggingface.co/{repo_id}"


def push_run(config: Any, adapter_dir: Path | None, merged_dir: Path | None) -> list[str]:
    """After training (rank 0): the adapter to config.push_to_hub, the merged model to its -merged repo."""
    from lora_runtime.distributed import print0

    urls = []
    if adapter_dir is not None:
        urls.append(push(config.push_to_hub, adapter_dir, what="LoRA adapter", only=adapter_files(adapter_dir)))
        print0(f"adapter pushed to {urls[-1]}")
    if merged_dir is not None:
        urls.append(push(merged_repo(config.push_to_hub), merged_dir, what="merged model"))
        print0(f"merged model pushed to {urls[-1]}")
    return urls
