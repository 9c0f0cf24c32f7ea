"""Fetching inputs from the Hugging Face Hub. huggingface_hub is imported only when a repo id is used."""

from __future__ import annotations

from .errors import HubError
from .references import ModelPath

# What a merge needs from a model repo: weights, their index, config, tokenizer. Never pickles or READMEs.
MODEL_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
                  "tokenizer*", "special_tokens_map.json", "*.model", "vocab.*", "merges.txt", "added_tokens.json",
                  "chat_template.jinja", "chat_template.json"]
# Only with --allow-pickle (a model published without safetensors weights).
PICKLE_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


def download(path: ModelPath, where: str, patterns: list[str] | None = None) -> str:
    """Download the files of ``path`` a merge needs into the Hub cache; return the local folder."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub import errors as hf_errors
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise HubError("huggingface_hub is not installed", where=where, hint="pip install huggingface_hub") from None
    try:
        return snapshot_download(path.path, revision=path.revision, allow_patterns=patterns or MODEL_PATTERNS)
    except hf_errors.GatedRepoError:
        raise HubError(f"'{path}' is gated: your account has not been granted access", where=where,
                       hint=f"accept its terms at https://huggingface.co/{path.path}, then `hf auth login`") from None
    except hf_errors.RevisionNotFoundError:
        raise HubError(f"revision '{path.revision}' of '{path.path}' not found", where=where,
                       hint="check the branch, tag or commit after '@'") from None
    except hf_errors.RepositoryNotFoundError:
        raise HubError(f"no local folder '{path.path}' and no Hub repository of that name", where=where,
                       hint="check the spelling; for a private repo run `hf auth login` or set HF_TOKEN") from None
    except hf_errors.OfflineModeIsEnabled:
        raise HubError(f"'{path}' is not in the local Hub cache and HF_HUB_OFFLINE is set", where=where,
                       hint="unset HF_HUB_OFFLINE, or download the model once while online") from None
    except hf_errors.LocalEntryNotFoundError:
        raise HubError(f"cannot reach the Hub to download '{path}', and it is not in the local cache", where=where,
                       hint="check your network connection, or download the model while online") from None
    except OSError as exc:
        raise HubError(f"download of '{path}' failed: {exc}", where=where,
                       hint="re-run to resume; check disk space and network") from None
